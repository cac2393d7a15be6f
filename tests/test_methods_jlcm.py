"""jlcm: grouping, the three mapping gradients, and joint learning that beats its k-means start."""

from __future__ import annotations

import pytest
import torch

from vqcompress.calibrate import InputStatistics
from vqcompress.coded import CodedWeight
from vqcompress.errors import VQCError
from vqcompress.methods import get_method, jlcm, make_config
from vqcompress.methods.jlcm import _Mixture, group_rows

JLCM = get_method("jlcm")


def skewed_problem(rows: int = 64, cols: int = 64, seed: int = 0):
    """Rows of four magnitudes and inputs of very unequal, correlated energy: where layer-aware
    learning has something to find."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g) * torch.tensor([0.2, 1.0, 3.0, 0.5]).repeat_interleave(rows // 4)[:, None]
    mix = torch.randn(cols, cols, generator=g) * torch.linspace(0.05, 2, cols)
    x = torch.randn(2000, cols, generator=g) @ mix
    return weight, InputStatistics(gram=x.T @ x / len(x), mean=x.mean(0))


def fit(weight, stats, **options):
    settings = JLCM.settings(tuple(weight.shape), options.pop("bits", 2), make_config(JLCM, options))
    return JLCM.fit(weight, settings, 0, stats)


def test_learning_beats_the_weighted_kmeans_start():
    weight, stats = skewed_problem()
    start = fit(weight, stats, steps=0)
    learned = fit(weight, stats, steps=60)
    error = [float(stats.error(c.decode() - weight)) for c in (start, learned)]
    assert error[1] < 0.8 * error[0]


@pytest.mark.parametrize("gradient", ["proximal", "soft", "ste"])
def test_every_gradient_learns_and_decodes_what_it_stores(gradient):
    weight, stats = skewed_problem()
    code = fit(weight, stats, steps=30, gradient=gradient)
    assert code.decode().shape == weight.shape
    assert float(stats.error(code.decode() - weight)) < float(stats.error(weight))


def test_grouping_is_a_permutation_that_makes_alike_rows_contiguous():
    weight, _ = skewed_problem()
    order = group_rows(weight, 4, by_magnitude=True)
    assert sorted(order.tolist()) == list(range(len(weight)))
    magnitude_class = (order // 16).reshape(4, -1)  # the problem has four classes of 16 rows
    assert all(len(set(group.tolist())) == 1 for group in magnitude_class)


def test_permuted_grouped_code_decodes_in_original_row_order():
    weight, stats = skewed_problem()
    code = fit(weight, stats, steps=10, scale="none")
    assert code.layout.permuted and code.layout.groups == 4
    plain = fit(weight, stats, steps=10, scale="none", grouping="none")
    assert not plain.layout.permuted
    for c in (code, plain):  # both approximate the original rows, not a shuffled version
        assert float(stats.error(c.decode() - weight)) < 0.5 * float(stats.error(weight))


def test_same_seed_same_codes():
    weight, stats = skewed_problem()
    a, b = fit(weight, stats, steps=10), fit(weight, stats, steps=10)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.codebook, b.codebook)


def test_mixture_gradients():
    torch.manual_seed(0)
    logits = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    candidates = torch.randn(5, 3, 4, 2, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(5, 3, 2, dtype=torch.float64)
    plain = (torch.softmax(logits / 0.5, -1)[..., None] * candidates).sum(-2)
    expected = torch.autograd.grad(plain, (logits, candidates), grad)
    soft = torch.autograd.grad(_Mixture.apply(logits, candidates, 0.5, "soft"), (logits, candidates), grad)
    assert all(torch.allclose(a, b) for a, b in zip(soft, expected))
    proximal = torch.autograd.grad(_Mixture.apply(logits, candidates, 0.5, "proximal"), (logits, candidates), grad)
    assert torch.allclose(proximal[1], expected[1])
    assert (proximal[0].abs() <= expected[0].abs() + 1e-12).all()  # shrunk, never grown
    hard = _Mixture.apply(logits, candidates, 0.5, "ste")
    chosen = candidates.gather(-2, logits.argmax(-1)[..., None, None].expand(5, 3, 1, 2)).squeeze(-2)
    assert torch.equal(hard, chosen)


@pytest.mark.parametrize(("options", "message"), [
    ({"gradient": "newton"}, "gradient must be one of"),
    ({"grouping": "random"}, "grouping must be"),
    ({"groups": 5}, "must divide the 64 rows"),
    ({"steps": -1}, "steps must be"),
    ({"mystery": 1}, "does not take"),
])
def test_bad_options(options, message):
    with pytest.raises(VQCError, match=message):
        JLCM.settings((64, 64), 2, make_config(JLCM, options))


def test_default_groups_divide_any_row_count():
    assert JLCM.settings((30522, 384), 2, JLCM.config())["groups"] == 3


def test_an_embedding_gets_the_nearest_codewords_of_its_start_in_original_row_order(monkeypatch):
    """Nothing is learnt where each row's error is its own: the codes are the row-weighted nearest
    codewords, and no candidate tensors (gigabytes for a 262k-row table) are built."""
    monkeypatch.setattr(jlcm, "learn", None)
    weight, _ = skewed_problem(rows=256)
    counts = torch.rand(256, generator=torch.Generator().manual_seed(1)) + 0.1
    code = fit(weight, InputStatistics(row_weight=counts))
    assert code.layout.permuted
    decoded = code.decode()
    unassigned = torch.zeros(code.layout.rows, code.layout.segments, dtype=torch.uint8)
    again = CodedWeight.encode(code.layout, code.codebook, unassigned, code.scale, perm=code.permutation())
    again.reassign(weight, counts[:, None])
    assert torch.equal(again.decode(), decoded)
    assert float(((decoded - weight).square() * counts[:, None]).sum()) < 0.2 * float((weight.square() * counts[:, None]).sum())
