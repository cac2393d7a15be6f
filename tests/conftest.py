"""Shared fixtures: small real-shaped models, and the real MiniLM compressed once per session."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class TinyNet(nn.Module):
    """One of each codable layer type, big enough to be coded under the default plan."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, 64)
        self.conv1 = nn.Conv1d(64, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64 + 32, 128)

    def forward(self, ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        tokens = self.conv1(self.embed(ids).transpose(1, 2)).mean(-1)
        pixels = self.conv2(image).mean((-1, -2))
        return self.head(torch.cat([self.norm(tokens), pixels], -1))


@pytest.fixture
def tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture
def tiny_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 10), generator=generator), torch.randn(2, 16, 8, 8, generator=generator)
