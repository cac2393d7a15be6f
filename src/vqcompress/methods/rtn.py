"""``rtn``: per-group affine scalar quantization, round to nearest — the honest baseline.

Expressed as a coded weight with d = 1: the codebook is the integer grid 0 … 2^b − 1 and every
group of ``group_size`` inputs in a row has its own fp16 scale and offset
(``w ≈ q · scale + offset``), so it costs b + 32 / group_size bits per weight. Where no group
size was asked for and the default does not divide a layer's inputs (a 5×5 depthwise kernel has
25), the layer gets the nearest one that does (``group_size_for``; its recipe says which).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..calibrate import InputStatistics
from ..coded import CodedWeight, CodeLayout
from ..errors import VQCError
from . import MethodConfig, register

DEFAULT_GROUP_SIZE = 64


@dataclass(frozen=True)
class RTNConfig(MethodConfig):
    """``group_size``: inputs per scale and offset (default 64, or the nearest size that divides a
    layer's inputs: ``group_size_for``)."""

    method: ClassVar[str] = "rtn"
    minimum: ClassVar[dict[str, float]] = {"group_size": 1}
    group_size: int | None = None


def group_size_for(cols: int, asked: int = DEFAULT_GROUP_SIZE) -> int:
    """The group size for rows of ``cols`` inputs: ``asked`` where it divides them; else the
    largest divisor below it if that is at least half of it (72 inputs: 36), else the smallest
    divisor above it (a row of a prime number of inputs: the whole row). A short row is one group."""
    if cols <= asked or cols % asked == 0:
        return min(cols, asked)
    below = max(d for d in range(1, asked + 1) if cols % d == 0)
    return below if 2 * below >= asked else next(d for d in range(asked + 1, cols + 1) if cols % d == 0)


class RTN:
    name = "rtn"
    config = RTNConfig
    learns_assignments = False
    needs_training = False
    weighs_inputs = False  # a fixed grid per group

    def settings(self, shape: tuple[int, ...], bits: float | None, config: RTNConfig) -> dict:
        if bits is None or bits != int(bits) or not 1 <= bits <= 8:
            raise VQCError(f"rtn needs a whole number of bits from 1 to 8 per layer, got {bits} (a model average "
                           "between whole bits: give calibration data, or bits=ModelAverage(...))")
        cols = int(torch.Size(shape[1:]).numel())
        if not config.group_size:
            return {"bits": int(bits), "group_size": group_size_for(cols)}
        group = config.group_size
        if group < 1 or cols % group:
            raise VQCError(f"rtn group size {group} does not divide the {cols} inputs of shape {tuple(shape)}")
        return {"bits": int(bits), "group_size": group}

    def layout(self, shape: tuple[int, ...], settings: dict) -> CodeLayout:
        return CodeLayout(tuple(shape), k=2 ** settings["bits"], dim=1, scale_group=settings["group_size"], offset=True)

    def fit(self, weight: Tensor, settings: dict, seed: int, inputs: InputStatistics | None = None) -> CodedWeight:
        """A fixed grid per group: the inputs do not change it."""
        layout = self.layout(tuple(weight.shape), settings)
        levels = layout.k - 1
        groups = weight.reshape(layout.rows, -1, layout.scale_group)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / levels).half().float().clamp_min(2**-24)  # stored precision; > 0 in fp16
        offset = low.half().float()
        codes = ((groups - offset[..., None]) / scale[..., None]).round().clamp(0, levels)
        grid = torch.arange(layout.k, dtype=torch.float32)
        return CodedWeight.encode(layout, grid, codes.reshape(layout.rows, -1), scale, offset)


register(RTN())
