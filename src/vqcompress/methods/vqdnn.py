"""``vqdnn``: vector quantization learned in training (VQ-DNN).

Starts from the per-layer k-means codebooks of ``kmeans`` (same options, same budget rule), then
the fine-tuning engine trains on data: the forward pass uses the quantized weights, the latent
weights get straight-through gradients, every codeword gets the summed gradient of its
segments, and segments are periodically re-assigned to their nearest codeword; at the end the
assignment is fixed. Needs training data and ``finetune_steps``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from . import register
from .kmeans import KMeans, KMeansConfig


@dataclass(frozen=True)
class VQDNNConfig(KMeansConfig):
    """kmeans' options: the codebooks it starts from."""

    method: ClassVar[str] = "vqdnn"


class VQDNN(KMeans):
    name = "vqdnn"
    config = VQDNNConfig
    learns_assignments = True
    needs_training = True


register(VQDNN())
