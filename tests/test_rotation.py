"""The incoherence rotation: orthogonal transforms of any size, coded layers in a rotated basis on
every forward path, the pipeline's option, the file, and what it does to heavy-tailed weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vqcompress as vqc
from vqcompress.calibrate import InputStatistics
from vqcompress.errors import VQCError
from vqcompress.io import read_manifest
from vqcompress.layers import coded_from_dense, dense_from_coded, rotates_rows
from vqcompress.rotation import Rotation, Transform

from .test_layers import ALL_CASES, HANDBUILT, assert_paths_agree, make


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 12, 96, 384, 640, 2048])
def test_transform_is_orthogonal_for_any_size(n):
    transform = Transform(n, seed=5)
    eye = torch.eye(n)
    matrix = transform(eye).T  # column i is T e_i
    torch.testing.assert_close(matrix @ matrix.T, eye, atol=1e-5, rtol=0)
    x = torch.randn(3, 2, n)
    torch.testing.assert_close(transform.inverse(transform(x)), x, atol=1e-5, rtol=0)


def test_transform_is_its_seed():
    x = torch.randn(4, 384)
    assert torch.equal(Transform(384, 1)(x), Transform(384, 1)(x))
    assert not torch.allclose(Transform(384, 1)(x), Transform(384, 2)(x))


@pytest.mark.parametrize("kind", ALL_CASES + HANDBUILT)
def test_rotated_layer_computes_its_dense_weight_on_every_path(kind):
    dense, code, x = make(kind)
    rotation = Rotation(code.layout.rows, code.layout.cols, seed=3, mix_rows=rotates_rows(dense))
    layer = coded_from_dense(dense, code, rotation)
    out = assert_paths_agree(layer, x)
    with torch.no_grad():
        reference = dense_from_coded(layer)(x)  # the decoded, un-rotated weight in a plain torch layer
    torch.testing.assert_close(out, reference, atol=1e-4 * reference.abs().max().item(), rtol=0)
    torch.testing.assert_close(rotation.from_stored(rotation.to_stored(dense.weight)), dense.weight,
                               atol=1e-5, rtol=0)


def test_outputs_of_an_embedding_are_never_rotated():
    dense, code, _ = make("embedding")
    with pytest.raises(VQCError, match="outputs cannot be rotated"):
        coded_from_dense(dense, code, Rotation(code.layout.rows, code.layout.cols, 0, mix_rows=True))


def test_rotated_statistics_keep_the_output_error():
    torch.manual_seed(0)
    inputs = torch.randn(200, 24) * torch.linspace(0.1, 3, 24)
    statistics = InputStatistics(gram=inputs.T @ inputs / len(inputs), mean=inputs.mean(0))
    rotation = Rotation(10, 24, seed=1, mix_rows=True)
    difference = torch.randn(10, 24)
    rotated = statistics.transformed(rotation.inputs)
    torch.testing.assert_close(rotated.error(rotation.to_stored(difference)), statistics.error(difference), rtol=1e-4, atol=0)
    torch.testing.assert_close(rotated.mean, rotation.inputs(statistics.mean))


def tied_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.ModuleDict({"embed": nn.Embedding(256, 32), "body": nn.Linear(32, 192), "head": nn.Linear(32, 256, bias=False)})
    model.head.weight = model.embed.weight
    return model


def run_tied(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    hidden = model.embed(ids)
    return model.head(hidden) + model.body(hidden).sum(-1, keepdim=True)


def test_compress_in_a_rotated_basis_round_trips_through_the_file(tmp_path):
    ids = torch.tensor([[1, 5, 255, 0]])
    plain = vqc.compress(tied_model(), "kmeans", bits=2, dim=4, k=16, progress=False)
    rotated = vqc.compress(tied_model(), "kmeans", bits=2, dim=4, k=16, transform="hadamard", progress=False)
    assert rotated.body.rotation.rows is not None  # a Linear's outputs mix too
    assert rotated.embed.rotation.rows is None and rotated.head.rotation.rows is None  # tied to an embedding
    assert rotated.head.weight_code is rotated.embed.weight_code
    path = tmp_path / "rotated.vqc"
    vqc.save(rotated, path)
    layers = read_manifest(path)[0]["layers"]
    assert layers["body"]["rotation"]["rows"] and not layers["embed"]["rotation"]["rows"]
    loaded = vqc.load(path, like=tied_model())
    with torch.no_grad():
        torch.testing.assert_close(run_tied(loaded, ids), run_tied(rotated, ids), atol=1e-5, rtol=0)
    assert vqc.report(path).coded_bits_per_weight == vqc.report(plain).coded_bits_per_weight  # a seed costs nothing


def kurtosis(weight: torch.Tensor) -> float:
    centred = weight - weight.mean()
    return float(centred.pow(4).mean() / centred.square().mean().square())


def test_rotated_weights_are_gaussian_whatever_their_structure():
    """Heavy tails and rows or inputs of spread-out scales all become near-Gaussian: the rotated
    weight's coding error is the Gaussian source's, which is what lets one codebook serve them all."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(512, 256, generator=generator)
    rows, cols = torch.randn(512, 1, generator=generator).exp(), torch.randn(1, 256, generator=generator).exp()
    heavy = torch.distributions.StudentT(3.0).sample((512, 256))
    weights = {"gaussian": base, "heavy tails": heavy, "row scales": base * rows, "input scales": base * cols}
    errors = {}
    for name, weight in weights.items():
        rotated = Rotation(512, 256, seed=0, mix_rows=True).to_stored(weight)
        assert abs(kurtosis(rotated) - 3) < 0.3, name
        layer = nn.Linear(256, 512, bias=False)
        with torch.no_grad():
            layer.weight.copy_(weight)
        coded = vqc.compress(layer, "kmeans", bits=2, dim=4, k=256, transform="hadamard", progress=False)
        errors[name] = float((coded.weight - weight).square().sum() / weight.square().sum())
    assert kurtosis(heavy) > 6
    assert all(abs(error / errors["gaussian"] - 1) < 0.15 for error in errors.values()), errors


def test_calibrated_and_fine_tuned_in_a_rotated_basis():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    inputs = torch.randn(256, 64)
    with torch.no_grad():
        reference = model(inputs)
    coded = vqc.compress(copy.deepcopy(model), "kmeans", bits=2, calibration=[inputs], transform="hadamard",
                         finetune_steps=3, progress=False)
    with torch.no_grad():
        error = (coded(inputs) - reference).norm() / reference.norm()
    assert coded[0].rotation is not None and error < 0.5


def test_an_unknown_transform_is_refused_in_words():
    with pytest.raises(VQCError, match="transform must be one of 'none', 'hadamard'"):
        vqc.compress(nn.Linear(16, 16), "kmeans", bits=2, transform="fourier", progress=False)
    with pytest.raises(VQCError, match="unknown rotation"):
        Rotation.from_json({"kind": "hadamard", "seed": "x", "rows": True}, 4, 4)
