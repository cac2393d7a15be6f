"""The peer wrappers run, keep the model runnable, and report the bits they really store."""

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("coremltools")
pytest.importorskip("hqq")
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import peers  # noqa: E402

SIDE = 128  # every layer is SIDE x SIDE; small keeps vector k-means quick
N_LAYERS = 2
N_WEIGHTS = N_LAYERS * SIDE * SIDE


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(SIDE, SIDE), nn.ReLU(), nn.Linear(SIDE, SIDE))


def original_weights() -> list[torch.Tensor]:
    return [make_model()[i].weight.detach().clone() for i in (0, 2)]


def relative_error(weights: list[torch.Tensor]) -> float:
    """Frobenius error of the compressed weights relative to the originals."""
    originals = original_weights()
    error = sum((w - o).pow(2).sum() for w, o in zip(weights, originals))
    return math.sqrt(error / sum(o.pow(2).sum() for o in originals))


def check_forward(model: nn.Module) -> None:
    x = torch.randn(8, SIDE)
    with torch.no_grad():
        y, reference = model(x), make_model()(x)
    assert y.dtype == torch.float32 and y.shape == reference.shape
    assert torch.isfinite(y).all() and not torch.equal(y, reference)


def coreml_error(n_bits: int) -> float:
    model = peers.coreml_palettize(make_model(), n_bits).model
    return relative_error([model[i].weight.detach() for i in (0, 2)])


def hqq_error(nbits: int) -> float:
    model = peers.hqq_quantize(make_model(), nbits).model
    return relative_error([model[i].dequantize() for i in (0, 2)])


@pytest.mark.parametrize(
    ("n_bits", "cluster_dim", "group_size"),
    [(2, 1, None), (3, 1, 64), (2, 2, None)],
)
def test_coreml_bits_match_hand_count(n_bits, cluster_dim, group_size):
    result = peers.coreml_palettize(make_model(), n_bits, cluster_dim, group_size)
    check_forward(result.model)
    luts_per_layer = 1 if group_size is None else SIDE // group_size
    lut_bits = luts_per_layer * 2**n_bits * cluster_dim * 16  # fp16 entries
    expected = N_LAYERS * (SIDE * SIDE // cluster_dim * n_bits + lut_bits)
    assert result.settings["layers"] == ["0", "2"]
    assert (result.compressed_bits, result.n_weights) == (expected, N_WEIGHTS)
    assert result.bits_per_weight == expected / N_WEIGHTS


def test_coreml_weights_hold_at_most_lut_size_values():
    model = peers.coreml_palettize(make_model(), 3, group_size=64).model
    for row_group in model[0].weight.detach().split(64):
        assert row_group.unique().numel() <= 2**3


@pytest.mark.parametrize("nbits", [1, 2, 3, 4])
def test_hqq_bits_match_hand_count(nbits):
    result = peers.hqq_quantize(make_model(), nbits, group_size=64)
    check_forward(result.model)
    groups = SIDE * SIDE // 64
    # HQQ packs 3-bit codes ten to an int32 word, padding the group count to a multiple of 10.
    code_bits = math.ceil(groups / 10) * 64 * 32 if nbits == 3 else SIDE * SIDE * nbits
    meta_bits = groups * 2 * 32  # one fp32 scale and one fp32 zero per group
    expected = N_LAYERS * (code_bits + meta_bits)
    assert (result.compressed_bits, result.n_weights) == (expected, N_WEIGHTS)
    assert result.bits_per_weight == expected / N_WEIGHTS


def test_more_bits_lower_the_weight_error():
    coreml = [coreml_error(b) for b in (1, 2, 3, 4)]
    hqq = [hqq_error(b) for b in (1, 2, 3, 4)]
    assert coreml == sorted(coreml, reverse=True) and len(set(coreml)) == 4
    assert hqq == sorted(hqq, reverse=True) and len(set(hqq)) == 4


def test_default_layers_skip_small_ones():
    model = nn.Sequential(nn.Linear(SIDE, SIDE), nn.Linear(SIDE, 2), nn.Embedding(100, 64))
    assert peers.default_layers(model, (nn.Linear, nn.Embedding)) == ["0", "2"]


def test_dkm_trains_and_counts_each_layers_own_lut():
    """DKM palettizes after its training steps; an override gives one layer its own width, counted as such."""
    def batches(step: int):
        generator = torch.Generator().manual_seed(step)
        return torch.randn(16, SIDE, generator=generator), torch.randint(0, SIDE, (16,), generator=generator)

    result = peers.dkm_palettize(make_model(), 1, steps=2, batches=batches, overrides={"2": (4, 1)})
    check_forward(result.model)
    expected = SIDE * SIDE * 1 + 2 * 16 + SIDE * SIDE * 4 + 16 * 16
    assert result.settings["layers"] == ["0", "2"]
    assert (result.compressed_bits, result.n_weights) == (expected, N_WEIGHTS)
    assert result.model[0].weight.detach().unique().numel() <= 2


def fisher_samples() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(4, SIDE, generator=generator) for _ in range(8)]


def skm(n_bits: int, cluster_dim: int = 1, group_size: int | None = None, samples=None, forward=None):
    forward = forward or (lambda model, x: model(x))
    return peers.skm_palettize(make_model(), n_bits, samples or fisher_samples(), peers.output_fisher_loss(forward),
                               cluster_dim, group_size)


@pytest.mark.parametrize(
    ("n_bits", "cluster_dim", "group_size"),
    [(2, 1, None), (3, 1, 64), (2, 2, None)],
)
def test_skm_bits_match_stored_lut_and_indices(n_bits, cluster_dim, group_size):
    result = skm(n_bits, cluster_dim, group_size)
    check_forward(result.model)
    luts_per_layer = 1 if group_size is None else SIDE // group_size
    expected = N_LAYERS * (SIDE * SIDE // cluster_dim * n_bits + luts_per_layer * 2**n_bits * cluster_dim * 16)
    assert result.settings["layers"] == ["0", "2"] and result.settings["unweighted"] == []
    assert (result.compressed_bits, result.n_weights) == (expected, N_WEIGHTS)
    for layer in (result.model[0], result.model[2]):
        lut = layer.get_buffer(peers.LUT_BUFFER)
        assert lut.shape[-2:] == (2**n_bits, cluster_dim) and lut.numel() == luts_per_layer * 2**n_bits * cluster_dim
        assert layer.weight.requires_grad  # the flags SKM needed are put back


def test_skm_weighs_the_weights_the_loss_reaches():
    """Inputs only on the first 8 features, whose weights are small: SKM spends its centroids on
    them and fits them far closer than data-free k-means, which spends them on the bulk."""
    def model() -> nn.Sequential:
        layer = make_model()
        with torch.no_grad():
            layer[0].weight[:, :8] *= 0.1
        return layer

    reached = torch.arange(SIDE) < 8
    samples = [x * reached for x in fisher_samples()]
    ours = peers.skm_palettize(model(), 2, samples, peers.output_fisher_loss(lambda m, x: m(x)), layer_names=["0"])
    plain = peers.coreml_palettize(model(), 2, layer_names=["0"])
    original = model()[0].weight.detach()[:, reached]
    errors = [(r.model[0].weight.detach()[:, reached] - original).norm() for r in (ours, plain)]
    assert errors[0] < 0.5 * errors[1]


def test_skm_layer_out_of_the_loss_is_plain_kmeans():
    result = skm(2, forward=lambda model, x: model[0](x))
    assert result.settings["unweighted"] == ["2"] and result.settings["layers"] == ["0", "2"]
    assert result.model[2].weight.detach().unique().numel() <= 4


def test_output_fisher_loss_gradient_is_masked_noise():
    """At the fp32 point a distillation loss has no gradient; this one's is −noise, zero at padding."""
    output = torch.randn(2, 3, 4, requires_grad=True)
    sample = {"attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}
    loss = peers.output_fisher_loss(lambda model, s: output)(None, sample)
    loss.backward()
    assert output.grad.abs().sum() > 0
    assert torch.equal(output.grad[0, 2], torch.zeros(4)) and torch.equal(output.grad[1, 1:], torch.zeros(2, 4))
    again = torch.autograd.grad(peers.output_fisher_loss(lambda model, s: output)(None, sample), output)[0]
    assert torch.equal(again, output.grad)  # seeded: a rerun draws the same noise


def test_sentence_samples_drop_padding():
    batch = {"input_ids": torch.tensor([[101, 7, 8, 102], [101, 9, 102, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
    samples = peers.sentence_samples([batch])
    assert [s["input_ids"].tolist() for s in samples] == [[[101, 7, 8, 102]], [[101, 9, 102]]]
    assert [s["attention_mask"].shape for s in samples] == [(1, 4), (1, 3)]
