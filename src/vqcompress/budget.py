"""A bit budget, one type per meaning, and the one place a plain number becomes one.

- ``PerLayer(b)``: every coded layer's index bits per weight at most ``b`` (its codebooks and
  scales come on top); each method picks the richest settings under it. What a run without
  calibration data gives a plain number: nothing is measured, every layer is alike.
- ``ModelAverage(b)``: the whole file at most ``b`` bits per weight of the original model's
  parameters (every byte it holds: codes, codebooks, scales, tensors left dense, header and
  manifest), spread over the layers by measured sensitivity (``allocate``). What a calibrated
  run gives a plain number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import VQCError

#: At 16 bits per weight and above the model is as small in fp16: nothing to code.
MAX_BITS = 16.0


def checked_bits(bits: object, what: str = "bits") -> float:
    """``bits`` as a float, or one line saying why it is no budget."""
    if isinstance(bits, bool) or not isinstance(bits, (int, float)):
        raise VQCError(f"{what} must be a number of bits per weight, got {bits!r}")
    if not math.isfinite(bits) or bits <= 0:
        raise VQCError(f"{what} must be a positive, finite number of bits per weight, got {bits}")
    if bits >= MAX_BITS:
        raise VQCError(f"{what} = {bits:g}: at {MAX_BITS:g} bits per weight or more the model is as small in fp16; "
                       "vqcompress codes below that")
    return float(bits)


@dataclass(frozen=True)
class _Bits:
    """A number of bits per weight, checked where it is made."""

    bits: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", checked_bits(self.bits))


class PerLayer(_Bits):
    """Each coded layer's index bits per weight at most ``bits``."""

    def describe(self) -> str:
        return f"{self.bits:g} index bits per weight at most, in every coded layer (codebooks and scales on top)"


class ModelAverage(_Bits):
    """The whole file at most ``bits`` per weight of the original model's parameters."""

    def describe(self) -> str:
        return f"{self.bits:g} bits per weight for the whole file (every byte), spread by measured sensitivity"


Budget = PerLayer | ModelAverage


def resolve(bits: float | Budget | None, calibrated: bool) -> Budget | None:
    """The budget ``bits`` means: a given ``PerLayer`` or ``ModelAverage`` as it is; a plain number
    is the model's average where calibration data lets the layers' sensitivities be measured, else
    each layer's ceiling."""
    if bits is None or isinstance(bits, (PerLayer, ModelAverage)):
        return bits
    return ModelAverage(bits) if calibrated else PerLayer(checked_bits(bits))
