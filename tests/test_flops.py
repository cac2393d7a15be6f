"""The analytic FLOP counter: dense m·n per position; the table k·n per table plus m·n/d adds."""

from __future__ import annotations

import torch
from torch import nn

from vqcompress.coded import CodedWeight, CodeLayout
from vqcompress.flops import layer_flops
from vqcompress.layers import coded_from_dense


def coded(layer: nn.Module, k: int, dim: int, **layout) -> nn.Module:
    shape = tuple(layer.weight.shape)
    lay = CodeLayout(shape, k=k, dim=dim, **layout)
    codes = torch.randint(0, k, (lay.rows, lay.segments))
    scales = torch.ones(lay.rows, lay.cols // lay.scale_group) if lay.scale_group else None
    offsets = torch.zeros_like(scales) if lay.offset else None
    return coded_from_dense(layer, CodedWeight.encode(lay, torch.randn(lay.groups, k, dim), codes, scales, offsets))


def test_linear_counts():
    flops = layer_flops(coded(nn.Linear(512, 1024), k=256, dim=4), positions=8)
    assert flops.dense_multiplies == 8 * 1024 * 512 and flops.dense_adds == 8 * 1024 * 511
    assert flops.lut_multiplies == 8 * 512 * 256  # (n/d segments) × k codewords × d
    assert flops.lut_adds == 8 * (128 * 256 * 3 + 1024 * 127)
    assert flops.multiply_ratio == 1024 / 256  # m / k


def test_codebook_groups_and_row_scales_add_tables_and_multiplies():
    flops = layer_flops(coded(nn.Linear(64, 32), k=16, dim=4, groups=2, scale_group=64), positions=1)
    assert flops.lut_multiplies == 2 * 64 * 16 + 32  # a table per codebook, one scale per row


def test_grouped_conv_builds_one_table_per_group():
    conv = coded(nn.Conv2d(16, 32, 3, groups=4), k=16, dim=4)  # cols = 4 · 9 = 36
    flops = layer_flops(conv, positions=10)
    assert flops.dense_multiplies == 10 * 32 * 36
    assert flops.lut_multiplies == 10 * 4 * 36 * 16


def test_rtn_offsets_cost_group_sums():
    flops = layer_flops(coded(nn.Linear(64, 8), k=4, dim=1, scale_group=16, offset=True), positions=1)
    assert flops.lut_multiplies == 64 * 4 + 8 * 4 + 8 * 4
    assert flops.lut_adds == 8 * 63 + 4 * 15 + 8 * 4  # d = 1: no adds inside the table


def test_factor_form_sums_s_weighted_picks_per_sub_vector():
    layer = nn.Linear(64, 32)
    lay = CodeLayout((32, 64), k=16, dim=4, terms=3, coef_bits=2, scale_group=64)
    positions = torch.stack([torch.randperm(16)[:3] for _ in range(32 * 16)]).reshape(32, 16, 3)
    code = CodedWeight.encode(lay, torch.randn(1, 16, 4), positions, torch.ones(32), coefficients=torch.ones(32, 16, 3))
    flops = layer_flops(coded_from_dense(layer, code), positions=1)
    assert flops.lut_multiplies == 16 * 16 * 4 + 32 * 16 * 3 + 32  # table, coefficients, row scales
    assert flops.lut_adds == 16 * 16 * 3 + 32 * (16 * 3 - 1)


def test_kept_rows_add_their_dense_products():
    layer = coded(nn.Linear(512, 1024), k=256, dim=4)
    plain = layer_flops(layer, positions=8)
    layer.weight_code.keep_rows(torch.randn(1024, 512), torch.arange(10))
    kept = layer_flops(layer, positions=8)
    assert kept.lut_multiplies - plain.lut_multiplies == 8 * 10 * 512
    assert kept.lut_adds - plain.lut_adds == 8 * 10 * 511
