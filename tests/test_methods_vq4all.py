"""vq4all: layers point at a universal codebook by hash; files never copy it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import vqcompress as vqc
from vqcompress import universal
from vqcompress.errors import VQCError
from vqcompress.finetune import Task, TrainingData
from vqcompress.io import read
from vqcompress.layers import iter_coded


@pytest.fixture
def book(tmp_path):
    torch.manual_seed(1)
    source = {"src": nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64))}
    return universal.save_codebook(universal.build(source, 4, 64, per_layer=1024), tmp_path / "books" / "u.vqcb")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64)).eval()


def test_layers_share_one_table_and_the_file_holds_no_codebook(tmp_path, book):
    model = vqc.compress(_model(), "vq4all", codebook=str(tmp_path / "books" / "u.vqcb"), progress=False)
    codes = [layer.weight_code for _, layer in iter_coded(model)]
    assert codes[0].codebook is codes[1].codebook
    assert all(c.layout.codebook_sha256 == book.sha256 for c in codes)
    path = vqc.save(model, tmp_path / "books" / "m.vqc")
    tensors, manifest = read(path)
    assert not any(name.endswith("codebook") for name in tensors)
    result = vqc.report(path)
    index_bits = 6 / 4  # k = 64, d = 4
    assert result.coded[0].bits_per_weight == pytest.approx(index_bits + 16 / 64)
    assert result.universal == {book.sha256: 64 * 4 * 16}
    assert result.bits_per_weight_sharing(2) < result.bits_per_weight_sharing(1)
    x = torch.randn(5, 64)
    loaded = vqc.load(path, like=_model())  # found beside the file
    assert torch.allclose(loaded(x), model(x), atol=1e-5)
    shared = [layer.weight_code.codebook for _, layer in iter_coded(loaded)]
    assert shared[0] is shared[1]


def test_a_missing_codebook_is_named_by_hash(tmp_path, book):
    model = vqc.compress(_model(), "vq4all", codebook=str(tmp_path / "books" / "u.vqcb"), progress=False)
    path = vqc.save(model, tmp_path / "alone" / "m.vqc")
    (tmp_path / "books" / "u.vqcb").unlink()
    with pytest.raises(VQCError, match=book.sha256):
        vqc.load(path, like=_model())


def test_fit_error_is_small_for_a_codebook_from_other_layers(tmp_path, book):
    weight = _model()[0].weight.detach()
    from vqcompress.methods import get_method

    method = get_method("vq4all")
    settings = method.settings(tuple(weight.shape), None, method.config(codebook=str(tmp_path / "books" / "u.vqcb")))
    code = method.fit(weight, settings, 0)
    error = float((code.decode() - weight).square().sum() / weight.square().sum())
    assert error < 0.25


def test_bad_inputs_fail_before_work(tmp_path, book):
    path = str(tmp_path / "books" / "u.vqcb")
    odd = nn.Sequential(nn.Linear(66, 128))
    with pytest.raises(VQCError, match="d = 4 does not divide the 66 inputs"):
        vqc.compress(odd, "vq4all", codebook=path, progress=False)
    with pytest.raises(VQCError, match="above its budget"):
        vqc.compress(_model(), "vq4all", bits=1.5, codebook=path, progress=False)


def test_without_a_codebook_the_one_the_package_ships_serves(tmp_path):
    """The plain ``vq4all`` call (it was refused): the default universal codebook, found again on load."""
    from vqcompress import universal

    model = vqc.compress(_model(), "vq4all", progress=False)
    codes = [layer.weight_code for _, layer in iter_coded(model)]
    assert {c.layout.codebook_sha256 for c in codes} == {universal.file_sha256(universal.DEFAULT)}
    loaded = vqc.load(vqc.save(model, tmp_path / "m.vqc"), like=_model())
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_progressive_distillation_ends_hard_and_keeps_the_codebook(tmp_path, book):
    teacher = _model()
    model = _model()
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(32, 64, generator=generator) for _ in range(4)]
    task = Task(forward=lambda m, b: m(b), loss=lambda s, t, b: (s - t).square().mean())
    data = TrainingData(task, lambda step: batches[step % 4], calibration_batches=2)
    before = vqc.compress(_model(), "vq4all", codebook=str(tmp_path / "books" / "u.vqcb"), progress=False)
    model = vqc.compress(model, "vq4all", calibration=data, codebook=str(tmp_path / "books" / "u.vqcb"),
                         finetune_steps=30, finetune_lr=1e-3, progress=False)
    codes = [layer.weight_code for _, layer in iter_coded(model)]
    assert all(c.assigner is None and "codebook" in c._buffers for c in codes)
    assert torch.equal(codes[0].codebook[0], book.codewords)
    x = torch.randn(64, 64, generator=generator)
    with torch.no_grad():
        distilled, nearest = (float((m(x) - teacher(x)).square().mean()) for m in (model, before))
    assert math.isfinite(distilled) and distilled < nearest


def test_norms_and_biases_tune_only_when_asked(tmp_path, book):
    batches = [torch.randn(16, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    task = Task(forward=lambda m, b: m(b), loss=lambda s, t, b: (s - t).square().mean())
    data = TrainingData(task, lambda step: batches[step % 2], calibration_batches=2)
    biases = {}
    for tune in (True, False):
        model = vqc.compress(_model(), "vq4all", calibration=data, codebook=str(tmp_path / "books" / "u.vqcb"),
                             finetune_steps=12, progress=False, tune_dense=tune)
        biases[tune] = model[0].bias.detach()
    assert torch.equal(biases[False], _model()[0].bias.detach())
    assert not torch.equal(biases[True], _model()[0].bias.detach())
