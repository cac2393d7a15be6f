"""The ``fashion-cnn`` and ``fashion-vit`` quality suites: top-1 accuracy on the Fashion-MNIST test set.

The models are the project's own zoo (``vqcompress.models.fashion``); a compressed one is judged
by how many points of test accuracy it has lost against its fp32 checkpoint.
"""

from __future__ import annotations

from torch import nn

from ..models.fashion import accuracy


def evaluate(model: nn.Module, device: str = "cpu") -> dict[str, float]:
    """Test accuracy in percent, rounded to 2 decimals (one image is 0.01 points)."""
    return {"accuracy": round(100 * accuracy(model, device=device), 2)}
