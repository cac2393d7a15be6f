"""Honest accounting: the report's bits are the bytes written, and the file size agrees."""

from __future__ import annotations

import math

import vqcompress as vqc
from vqcompress.layers import iter_coded


def test_report_counts_every_buffer_and_matches_file_size(tmp_path, tiny):
    model = vqc.compress(tiny, "kmeans", bits=2, progress=False)
    in_memory = vqc.report(model)
    path = vqc.save(model, tmp_path / "m.vqc")
    on_disk = vqc.report(path)
    coded = dict(iter_coded(model))
    for row in on_disk.coded:
        assert row.bits == coded[row.name].weight_code.nbits()
        assert row.weights == math.prod(coded[row.name].weight_code.layout.shape)
    dense_params = sum(p.numel() for n, p in model.named_parameters() if ".weight_code." not in n)
    assert on_disk.parameters == on_disk.coded_weights + dense_params
    assert on_disk.total_bits == in_memory.total_bits
    header_bytes = 8 + int.from_bytes(path.read_bytes()[:8], "little")  # safetensors: length, JSON, data
    assert on_disk.file_bytes == header_bytes + on_disk.total_bits // 8
    assert {r.name for r in on_disk.dense} >= {"norm.weight", "norm.bias", "head.bias"}


def test_rtn_pays_for_scales_and_offsets(tiny):
    model = vqc.compress(tiny, "rtn", bits=3, group_size=16, progress=False)
    for row in vqc.report(model).coded:
        codes_bits = math.ceil(row.weights * 3 / 8) * 8
        scale_bits = 2 * 16 * row.weights // 16
        assert row.bits == codes_bits + scale_bits + 8 * 16  # + the 8-entry fp16 grid


def test_json_has_the_totals(tiny):
    data = vqc.report(vqc.compress(tiny, "kmeans", bits=2, progress=False)).to_json()
    assert data["ratio_vs_fp32"] == 32 / data["model_bits_per_weight"]
    assert len(data["coded_layers"]) == 4 and data["uncompressed"]


def test_a_model_larger_than_fp16_is_said_to_be_larger(tiny):
    """Mostly left dense in fp32, a model is 1.x times the size of its fp16 twin: "larger", not "0.6× smaller"."""
    model = vqc.compress(tiny, "kmeans", bits=8, plan=vqc.Plan(by_name={"embed|conv1|conv2": None}), progress=False)
    result = vqc.report(model)
    assert 16 < result.model_bits_per_weight < 32
    line = str(result).splitlines()[-1]
    assert f"{32 / result.model_bits_per_weight:.1f}× smaller than fp32" in line
    assert line.endswith(f"{result.model_bits_per_weight / 16:.1f}× larger than fp16")


def test_a_bare_coded_layer_is_counted_from_memory_and_from_its_file(tmp_path):
    import torch

    coded = vqc.compress(torch.nn.Linear(256, 64), "vq4all", progress=False)  # a universal codebook: found by hash
    vqc.save(coded, tmp_path / "layer.vqc")
    loaded = vqc.load(tmp_path / "layer.vqc", like=torch.nn.Linear(256, 64))
    assert torch.equal(loaded.weight, coded.weight)
    expected = coded.weight_code.nbits() / coded.weight.numel()
    assert vqc.report(coded).coded_bits_per_weight == vqc.report(tmp_path / "layer.vqc").coded_bits_per_weight == expected > 2
