"""qswd: W ≈ Z·C with Z sparse and quantized; its special cases and its checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vqcompress as vqc
from vqcompress.errors import VQCError
from vqcompress.layers import iter_coded
from vqcompress.methods import get_method, make_config

QSWD = get_method("qswd")


def _weight(rows: int = 96, cols: int = 64, seed: int = 0) -> torch.Tensor:
    """Correlated, heavy-tailed rows: a weight with structure for the fits to find."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=generator) / cols**0.5
    return torch.randn(rows, cols, generator=generator).pow(3) @ mixing


def _fit(weight: torch.Tensor, **options) -> torch.Tensor:
    settings = QSWD.settings(tuple(weight.shape), None, make_config(QSWD, options))
    return QSWD.fit(weight, settings, seed=0).decode()


def _relative_error(approx: torch.Tensor, weight: torch.Tensor) -> float:
    return float((approx - weight).square().sum() / weight.square().sum())


def test_one_unit_term_is_kmeans():
    weight = _weight()
    kmeans = get_method("kmeans")
    vq = kmeans.fit(weight, kmeans.settings(tuple(weight.shape), None, kmeans.config(dim=4, k=16, scale="none")),
                    seed=0).decode()
    plain = dict(dim=4, k=16, terms=1, coef_bits=0, codebook_bits=0, scale="none")
    start = _fit(weight, **plain, iterations=0)  # k-means start, nearest codeword, one centroid update
    assert _relative_error(start, weight) == pytest.approx(_relative_error(vq, weight), rel=0.02)
    assert _relative_error(_fit(weight, **plain, iterations=5), weight) <= _relative_error(vq, weight) * 1.001


@pytest.mark.parametrize("init", ["svd", "kmeans"])
def test_dense_unquantized_factors_give_the_truncated_svd_error(init):
    weight, dim, k = _weight(), 8, 3
    points = weight.reshape(-1, dim).double()
    tail = torch.linalg.svdvals(points)[k:].square().sum() / points.square().sum()
    fitted = _fit(weight, dim=dim, k=k, terms=k, coef_bits=16, codebook_bits=0, scale="none", init=init, iterations=30)
    assert _relative_error(fitted, weight) == pytest.approx(float(tail), rel=0.02)


def test_more_terms_never_fit_worse_at_fixed_k():
    weight = _weight()
    errors = [_relative_error(_fit(weight, dim=8, k=32, terms=s, coef_bits=16, codebook_bits=0), weight)
              for s in (1, 2, 3, 4, 6)]
    assert all(later <= earlier * 1.0001 for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 3


def test_budget_picks_settings_that_fit_and_says_which():
    shape = (96, 384)
    for bits in (0.7, 1.1, 2.1, 3.1, 4.1, 6.1):
        settings = QSWD.settings(shape, bits, QSWD.config())
        assert QSWD.bits_per_weight(shape, settings) <= bits
        code = QSWD.fit(_weight(*shape), settings, seed=0)
        assert code.nbits() / (shape[0] * shape[1]) == pytest.approx(QSWD.bits_per_weight(shape, settings), abs=1e-3)
    picked = QSWD.settings((384, 1536), 2.7, QSWD.config())
    assert (picked["dim"], picked["k"], picked["terms"], picked["coef_bits"]) == (2, 32, 1, 0)  # the table's 2.5 row


def test_error_falls_with_bits():
    weight = _weight(256, 256)
    errors = [_relative_error(QSWD.fit(weight, QSWD.settings(tuple(weight.shape), b, QSWD.config()), 0).decode(), weight)
              for b in (1.1, 2.1, 3.1, 4.1, 6.1)]
    assert all(later <= earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 100


@pytest.mark.parametrize("options, message", [
    ({"dim": 8, "k": 4, "terms": 6, "coef_bits": 2}, "exceed"),
    ({"dim": 8, "k": 256, "terms": 4, "coef_bits": 8, "bits": 1.0}, "costs"),
    ({"dim": 8, "k": 16, "terms": 2, "coef_bits": 3, "scale": "none"}, "row scales"),
    ({"dim": 8, "k": 16, "terms": 2, "coef_bits": 3, "init": "svd"}, "k ≤ d"),
    ({"dim": 7, "k": 16, "terms": 2, "coef_bits": 3}, "divide"),
    ({"dim": 8, "k": 16, "terms": 2}, "needs --bits"),
])
def test_bad_settings_fail_before_any_work(options, message):
    options = dict(options)
    bits = options.pop("bits", None)
    with pytest.raises(VQCError, match=message):
        QSWD.settings((64, 64), bits, make_config(QSWD, options))
    with pytest.raises(VQCError, match="no qswd setting fits"):
        QSWD.settings((64, 64), 0.01, QSWD.config())


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128)).eval()


@pytest.mark.parametrize("options", [{"bits": 4.2}, {"dim": 4, "k": 16, "terms": 5, "coef_bits": 3, "codebook_bits": 6}])
def test_whole_model_round_trip_with_exact_bits(tmp_path, options):
    model, x = _mlp(), torch.randn(8, 128)
    reference = model(x)
    vqc.compress(model, "qswd", progress=False, **options)
    if "terms" in options:
        assert {layer.weight_code.layout.describe_form() for _, layer in iter_coded(model)} == {"Z·C s=5 z=3b C=6b mask"}
    path = vqc.save(model, tmp_path / "m.vqc")
    loaded = vqc.load(path, like=_mlp())
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        vqc.set_forward_path(loaded, "lut")
        assert torch.allclose(loaded(x), model(x), atol=1e-4)
        assert float((model(x) - reference).square().mean() / reference.square().mean()) < 0.05
    report = vqc.report(path)
    options = dict(options)
    bits = options.pop("bits", None)
    for row in report.coded:  # every byte as the method counts it, within the budget
        expected = QSWD.bits_per_weight(row.shape, QSWD.settings(row.shape, bits, make_config(QSWD, options)))
        assert row.bits_per_weight == pytest.approx(expected, abs=1e-3)
        assert bits is None or row.bits_per_weight <= bits
    assert report.total_bits <= path.stat().st_size * 8


def test_fine_tuning_trains_factors_with_positions_fixed():
    from tests.test_finetune import batch_at, distillation_loss, mlp
    from vqcompress.finetune import classification_task, finetune

    teacher = mlp()
    student = vqc.compress(mlp(), "qswd", dim=8, k=16, terms=2, coef_bits=2, codebook_bits=4, progress=False)
    codes = [layer.weight_code for _, layer in iter_coded(student)]
    positions = [code.positions() for code in codes]
    sizes = [code.nbits() for code in codes]
    before = distillation_loss(student, teacher)
    finetune(student, teacher, classification_task(), batch_at, steps=60, lr=3e-3, progress=False)
    assert distillation_loss(student, teacher) < 0.9 * before
    assert all(torch.equal(p, code.positions()) for p, code in zip(positions, codes))
    assert [code.nbits() for code in codes] == sizes and not any(list(code.parameters()) for code in codes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_factor_form_runs_on_cuda():
    model = _mlp()
    vqc.compress(model, "qswd", dim=4, k=16, terms=3, coef_bits=2, codebook_bits=6, progress=False)
    x = torch.randn(8, 128)
    with torch.no_grad():
        expected = model(x)
        model.to("cuda")
        assert all(b.device.type == "cuda" for b in model.buffers())
        torch.testing.assert_close(model(x.cuda()).cpu(), expected, rtol=1e-4, atol=1e-4)
        vqc.set_forward_path(model, "lut")
        torch.testing.assert_close(model(x.cuda()).cpu(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("options", [{"dim": 4, "k": 16, "terms": 1, "coef_bits": 0},
                                     {"dim": 4, "k": 16, "terms": 2, "coef_bits": 2}])
def test_row_scales_in_slices_of_rows_give_the_same_weight(options, monkeypatch):
    import vqcompress.coded as coded_module

    weight = _weight()
    whole = _fit(weight, scale="row", **options)
    monkeypatch.setattr(coded_module, "SLICE_WEIGHTS", 64 * 5)  # 5 rows a slice: 96 rows end mid-slice
    torch.testing.assert_close(_fit(weight, scale="row", **options), whole, rtol=0, atol=0)
