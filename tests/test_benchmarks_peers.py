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
