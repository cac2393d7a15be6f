"""Analytic arithmetic of a coded layer: the dense product against the lookup-table product.

Counts are per call for ``positions`` input vectors (batch × tokens for a Linear, batch × output
pixels for a convolution). The lookup table costs ``k·n`` multiplies per (input group, codebook)
pair instead of ``m·n``: it pays when k is small against the number of output rows m. In the
factor form (W = Z·C) each output sums s picks per sub-vector, each times its coefficient.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .layers import CodedLayer, CodedLinear


@dataclass(frozen=True)
class Flops:
    dense_multiplies: int
    dense_adds: int
    lut_multiplies: int
    lut_adds: int

    @property
    def multiply_ratio(self) -> float:
        """Dense multiplies per lookup-table multiply (> 1: the table saves multiplies)."""
        return self.dense_multiplies / max(1, self.lut_multiplies)

    def to_json(self) -> dict:
        return asdict(self) | {"multiply_ratio": self.multiply_ratio}


def _input_groups(layer: CodedLayer) -> int:
    return 1 if isinstance(layer, CodedLinear) else layer.groups


def _table_pairs(layer: CodedLayer) -> int:
    """How many (input group, codebook) tables a call builds: each pair that some row uses."""
    lay = layer.weight_code.layout
    input_groups = _input_groups(layer)
    rows = torch.arange(lay.rows)
    original = layer.weight_code.permutation()
    pairs = (original // (lay.rows // input_groups)) * lay.groups + rows // (lay.rows // lay.groups)
    return len(torch.unique(pairs))


def layer_flops(layer: CodedLayer, positions: int) -> Flops:
    """Multiplies and adds of one call of ``layer`` on ``positions`` input vectors."""
    lay = layer.weight_code.layout
    m, n, d, k = lay.rows, lay.cols, lay.dim, lay.k
    segments = n // d
    tables = _table_pairs(layer)
    picks = segments * lay.terms  # table entries summed per output (the factor form: s per sub-vector)
    lut_mul = tables * segments * k * d + (m * picks if lay.coef_bits else 0)  # each pick × its coefficient
    lut_add = tables * segments * k * (d - 1) + m * (picks - 1)
    if lay.scale_group:  # sum each scale group's segments, then one multiply per row and group
        groups = n // lay.scale_group
        lut_mul += m * groups
        if lay.offset:  # input sums per group, then one multiply-add per row and group
            lut_add += _input_groups(layer) * groups * (lay.scale_group - 1) + m * groups
            lut_mul += m * groups
    if lay.gain:  # one multiply per output
        lut_mul += m
    lut_mul += lay.kept_rows * n  # kept rows: their exact products, done densely (their table sums are counted above)
    lut_add += lay.kept_rows * (n - 1)
    return Flops(positions * m * n, positions * m * (n - 1), positions * lut_mul, positions * lut_add)
