"""E8P: the 2^16-point codebook, its exact structured search, and its use as a universal codebook."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vqcompress as vqc
from vqcompress import lattice, universal


def test_the_table_is_2_to_the_16_distinct_points_of_e8_plus_a_quarter():
    points = lattice.table().double() * lattice.UNIT
    assert points.shape == (1 << 16, 8) and len(torch.unique(points.round(decimals=6), dim=0)) == 1 << 16
    codes = torch.arange(1 << 16)
    for bit, shift in ((1, 0.25), (0, -0.25)):  # each half: points of D8 + 1/2 with an even sum (in E8), shifted
        half = points[codes & 1 == bit] - shift
        assert torch.allclose(half % 1, torch.full_like(half, 0.5)) and (half.sum(-1).round() % 2 == 0).all()
    assert torch.equal(lattice.decode(torch.arange(1 << 16)).float(), lattice.table())


@pytest.mark.parametrize("scale", [0.2, 1.0, 3.0])
def test_the_structured_search_is_the_exact_nearest_point(scale):
    points = torch.randn(4000, 8, generator=torch.Generator().manual_seed(1)) * scale
    distances = torch.cdist(points.double(), lattice.table().double())
    found = lattice.nearest(points)
    assert torch.allclose(distances.gather(1, found[:, None])[:, 0], distances.min(1).values, atol=1e-9)


def test_a_unit_gaussian_is_coded_near_the_lattice_figure():
    points = torch.randn(100_000, 8, generator=torch.Generator().manual_seed(0))
    error = (lattice.table()[lattice.nearest(points)] - points).square().sum() / points.square().sum()
    assert 0.088 < error < 0.094  # 2 bits per weight; the Gaussian limit is 0.0625 (docs/methods.md)


def test_vq4all_codes_with_the_lattice_and_the_file_finds_it_by_hash(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
    inputs = torch.randn(64, 256)
    coded = vqc.compress(copy.deepcopy(model), "vq4all", codebook="e8p", transform="hadamard", calibration=[inputs],
                         progress=False)
    assert coded[0].weight_code.layout.dim == 8 and coded[0].weight_code.layout.k == 1 << 16
    path = tmp_path / "e8p.vqc"
    vqc.save(coded, path)
    assert path.stat().st_size < 65536 * 8 * 2  # the table is never in the file
    assert vqc.report(path).coded_bits_per_weight < 2.1
    monkeypatch.setenv("VQC_CACHE", str(tmp_path / "fresh-cache"))  # a machine that never wrote the table
    monkeypatch.setattr(universal, "_PATHS", {})
    loaded = vqc.load(path, like=copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), coded(inputs))
        error = (coded(inputs) - model(inputs)).norm() / model(inputs).norm()
    assert error < 0.5


def test_fine_tuning_keeps_a_lattice_s_codes_and_trains_its_scales():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
    inputs = [torch.randn(32, 256)]
    fitted, tuned = (vqc.compress(copy.deepcopy(model), "vq4all", codebook="e8p", transform="hadamard",
                                  calibration=inputs, finetune_steps=steps, calibrate=True, progress=False)
                     for steps in (0, 3))
    assert torch.equal(fitted[0].weight_code.codes, tuned[0].weight_code.codes)
    assert not torch.equal(fitted[0].weight_code.scale, tuned[0].weight_code.scale)
