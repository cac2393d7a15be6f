"""Coded layers: the lookup-table and decode paths compute the same function as the dense layer
with the decoded weight, survive state_dict round trips bit for bit, and hold no dense weight."""

from __future__ import annotations

import copy
import functools
import json
import math

import pytest
import torch
from torch import nn

from vqcompress.coded import CodedWeight, CodeLayout
from vqcompress.errors import VQCError
from vqcompress.layers import (
    CodedConv1d,
    CodedConv2d,
    CodedEmbedding,
    CodedLayer,
    CodedLinear,
    coded_from_args,
    coded_from_dense,
    densify,
    layer_args,
    set_forward_path,
)
from vqcompress.methods import get_method, make_config


def fit(weight: torch.Tensor, method: str, bits: float | None, **options) -> CodedWeight:
    m = get_method(method)
    settings = m.settings(tuple(weight.shape), bits, make_config(m, options))
    m.layout(tuple(weight.shape), settings).validate()
    return m.fit(weight.detach().float(), settings, 0)


def permuted(code: CodedWeight, seed: int = 0) -> CodedWeight:
    """The same weight stored with its rows shuffled (stored row r = original row perm[r])."""
    lay = code.layout
    assert lay.groups == 1  # a codebook per row block would change meaning under shuffling
    perm = torch.randperm(lay.rows, generator=torch.Generator().manual_seed(seed))
    layout = CodeLayout(**{**lay.to_json(), "shape": lay.shape, "permuted": True})
    scale = None if lay.scale_group is None else code.scale.float()[perm]
    offset = None if not lay.offset else code.offset.float()[perm]
    shuffled = CodedWeight.encode(layout, code.codebook.float(), code.code_matrix()[perm], scale, offset, perm)
    assert torch.equal(shuffled.decode(), code.decode())  # same weight, other storage order
    assert not torch.equal(shuffled.codes, code.codes) or lay.rows == 1
    return shuffled


def with_kept_rows(code: CodedWeight, weight: torch.Tensor, rows: list[int]) -> CodedWeight:
    """The same code with a few rows stored exactly (the paths must override those rows)."""
    code.keep_rows(weight.detach().float(), torch.tensor(rows))
    return code


def handbuilt(shape, dim: int, k: int, scale_group: int, offset: bool, groups: int = 1, perm: bool = False) -> CodedWeight:
    """A code no method makes yet: d > 1 with scales (and offsets) on blocks shorter than a row."""
    layout = CodeLayout(tuple(shape), k=k, dim=dim, groups=groups, scale_group=scale_group, offset=offset, permuted=perm)
    g = torch.Generator().manual_seed(2)
    n_scales = layout.cols // scale_group
    return CodedWeight.encode(
        layout, torch.randn(groups, k, dim, generator=g), torch.randint(0, k, (layout.rows, layout.segments), generator=g),
        torch.rand(layout.rows, n_scales, generator=g) + 0.5,
        torch.randn(layout.rows, n_scales, generator=g) * 0.1 if offset else None,
        torch.randperm(layout.rows, generator=g) if perm else None)


def run(layer: nn.Module, x: torch.Tensor, path: str) -> torch.Tensor:
    layer.set_forward_path(path)
    with torch.no_grad():
        return layer(x)


def assert_paths_agree(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    decoded = run(layer, x, "decode")
    scale = decoded.abs().max().item()
    assert scale > 0
    for path in ("lut", "auto"):
        out = run(layer, x, path)
        assert out.shape == decoded.shape
        torch.testing.assert_close(out, decoded, rtol=0, atol=1e-4 * scale)
    return decoded


def make(kind: str):
    """(dense layer, code, input): a fresh copy of the case, fitted once per session."""
    return copy.deepcopy(_make(kind))


@functools.lru_cache(maxsize=None)
def _make(kind: str):
    """(dense layer, code, input) for every case; dense weights are random, codes from real methods."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "linear":
        dense = nn.Linear(32, 48)
        return dense, fit(dense.weight, "kmeans", 2), torch.randn(5, 32, generator=g)
    if kind == "linear-3d":
        dense = nn.Linear(32, 48)
        return dense, fit(dense.weight, "kmeans", 2), torch.randn(2, 3, 32, generator=g)
    if kind == "linear-rowscale-groups":
        dense = nn.Linear(32, 48)
        return dense, fit(dense.weight, "kmeans", 2, dim=2, scale="row", groups=2), torch.randn(2, 3, 32, generator=g)
    if kind == "linear-rtn":
        dense = nn.Linear(32, 48)
        return dense, fit(dense.weight, "rtn", 3, group_size=8), torch.randn(4, 32, generator=g)
    if kind == "linear-permuted":
        dense = nn.Linear(32, 48)
        return dense, permuted(fit(dense.weight, "kmeans", 2, scale="row")), torch.randn(4, 32, generator=g)
    if kind == "linear-rtn-permuted":
        dense = nn.Linear(32, 48, bias=False)
        return dense, permuted(fit(dense.weight, "rtn", 4, group_size=16)), torch.randn(4, 32, generator=g)
    if kind == "conv1d":
        dense = nn.Conv1d(8, 12, 3, stride=2, padding=1, dilation=2, groups=2)
        return dense, fit(dense.weight, "kmeans", None, dim=2, k=16), torch.randn(2, 8, 17, generator=g)
    if kind == "conv1d-rtn-permuted":
        dense = nn.Conv1d(8, 12, 3, stride=2, padding=1, dilation=2, groups=2)
        return dense, permuted(fit(dense.weight, "rtn", 4, group_size=6)), torch.randn(2, 8, 17, generator=g)
    if kind == "conv2d":
        dense = nn.Conv2d(8, 16, 3, padding=1)
        return dense, fit(dense.weight, "kmeans", None, dim=4, k=32), torch.randn(2, 8, 7, 6, generator=g)
    if kind == "conv2d-stride2":
        dense = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        return dense, fit(dense.weight, "kmeans", None, dim=4, k=32, scale="row"), torch.randn(2, 8, 9, 8, generator=g)
    if kind == "conv2d-groups4":
        dense = nn.Conv2d(8, 16, 3, padding=1, groups=4)
        return dense, fit(dense.weight, "kmeans", None, dim=2, k=16, groups=2), torch.randn(2, 8, 6, 6, generator=g)
    if kind == "conv2d-groups2-rtn":
        dense = nn.Conv2d(8, 16, 3, padding=1, groups=2)
        return dense, fit(dense.weight, "rtn", 3, group_size=12), torch.randn(2, 8, 6, 6, generator=g)
    if kind == "conv2d-groups4-permuted":
        dense = nn.Conv2d(8, 16, 3, padding=1, groups=4)
        return dense, permuted(fit(dense.weight, "kmeans", None, dim=2, k=16, scale="row")), torch.randn(2, 8, 6, 6, generator=g)
    if kind == "conv2d-depthwise":
        dense = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        return dense, fit(dense.weight, "kmeans", None, dim=3, k=8), torch.randn(2, 8, 6, 5, generator=g)
    if kind == "conv2d-reflect":
        dense = nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect")
        return dense, fit(dense.weight, "kmeans", None, dim=4, k=32), torch.randn(2, 8, 6, 6, generator=g)
    if kind == "conv2d-same":
        dense = nn.Conv2d(8, 16, (3, 4), padding="same", dilation=(1, 2))  # asymmetric "same" padding
        return dense, fit(dense.weight, "kmeans", None, dim=4, k=32), torch.randn(2, 8, 7, 9, generator=g)
    if kind == "conv2d-nobias":
        dense = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        return dense, fit(dense.weight, "rtn", 4, group_size=9), torch.randn(2, 8, 6, 6, generator=g)
    if kind == "linear-kept-rows":
        dense = nn.Linear(32, 48)
        code = fit(dense.weight, "kmeans", None, dim=4, k=16, scale="row")
        return dense, with_kept_rows(code, dense.weight, [47, 0, 9]), torch.randn(4, 32, generator=g)
    if kind == "conv2d-groups4-kept-rows":
        dense = nn.Conv2d(8, 16, 3, padding=1, groups=4)
        code = fit(dense.weight, "kmeans", None, dim=2, k=16, groups=2)
        return dense, with_kept_rows(code, dense.weight, [3, 15]), torch.randn(2, 8, 6, 6, generator=g)
    if kind == "linear-handbuilt":
        dense = nn.Linear(32, 48)
        return dense, handbuilt((48, 32), dim=4, k=16, scale_group=8, offset=True, groups=2, perm=True), torch.randn(4, 32, generator=g)
    if kind == "conv2d-handbuilt":
        dense = nn.Conv2d(8, 16, 2, padding=1, groups=2)
        return dense, handbuilt((16, 4, 2, 2), dim=2, k=8, scale_group=4, offset=True, perm=True), torch.randn(2, 8, 5, 5, generator=g)
    if kind == "embedding":
        dense = nn.Embedding(50, 16, padding_idx=3)
        return dense, fit(dense.weight, "kmeans", None, dim=4, k=16), torch.tensor([[0, 3, 49, 7, 7], [3, 1, 0, 2, 49]])
    if kind == "embedding-kept-rows":
        dense = nn.Embedding(50, 16)
        code = fit(dense.weight, "kmeans", None, dim=4, k=16)
        return dense, with_kept_rows(code, dense.weight, [49, 7]), torch.tensor([[0, 3, 49, 7, 7], [3, 1, 0, 2, 49]])
    if kind == "embedding-permuted":
        dense = nn.Embedding(50, 16)
        return dense, permuted(fit(dense.weight, "rtn", 4, group_size=8)), torch.tensor([[0, 3, 49, 7, 7], [3, 1, 0, 2, 49]])
    raise AssertionError(kind)


MATMUL_CASES = ["linear", "linear-3d", "linear-rowscale-groups", "linear-rtn", "linear-permuted",
                "linear-rtn-permuted", "conv1d", "conv1d-rtn-permuted", "conv2d", "conv2d-stride2",
                "conv2d-groups4", "conv2d-groups2-rtn", "conv2d-groups4-permuted", "conv2d-depthwise",
                "conv2d-reflect", "conv2d-same", "conv2d-nobias", "linear-kept-rows", "conv2d-groups4-kept-rows"]
ALL_CASES = MATMUL_CASES + ["embedding", "embedding-permuted", "embedding-kept-rows"]
HANDBUILT = ["linear-handbuilt", "conv2d-handbuilt"]  # not approximations of the dense layer
CODED_OF = {nn.Linear: CodedLinear, nn.Conv1d: CodedConv1d, nn.Conv2d: CodedConv2d, nn.Embedding: CodedEmbedding}


@pytest.mark.parametrize("kind", ALL_CASES + HANDBUILT)
def test_lut_and_decode_paths_agree(kind):
    dense, code, x = make(kind)
    layer = coded_from_dense(dense, code)
    assert type(layer) is CODED_OF[type(dense)] and isinstance(layer, type(dense))
    out = assert_paths_agree(layer, x)
    if kind in HANDBUILT:
        return
    # and the coded layer is still an approximation of the dense one (not some unrelated function)
    with torch.no_grad():
        reference = dense(x)
    assert out.shape == reference.shape
    assert (out - reference).norm() < 0.8 * reference.norm()


@pytest.mark.parametrize("kind", ALL_CASES + HANDBUILT)
def test_decode_path_is_the_densified_layer(kind):
    dense, code, x = make(kind)
    layer = coded_from_dense(dense, code)
    layer.set_forward_path("decode")
    model = nn.Sequential(layer)
    with torch.no_grad():
        coded_out = model(x)
    densify(model)
    plain = model[0]
    assert type(plain) is type(dense)
    assert not isinstance(plain, CodedLayer)
    assert torch.equal(plain.weight, code.decode())
    assert plain.weight.shape == dense.weight.shape
    if getattr(dense, "bias", None) is not None:
        assert torch.equal(plain.bias, dense.bias)
    else:
        assert getattr(plain, "bias", None) is None
    assert layer_args(plain) == layer_args(dense)
    with torch.no_grad():
        assert torch.equal(plain(x), coded_out)


def test_densify_a_bare_coded_layer():
    dense, code, x = make("linear")
    layer = coded_from_dense(dense, code)
    plain = densify(layer)
    assert type(plain) is nn.Linear
    with torch.no_grad():
        assert torch.equal(plain(x), layer(x))


@pytest.mark.parametrize("kind", ALL_CASES + HANDBUILT)
def test_state_dict_round_trip_bit_for_bit(kind):
    dense, code, x = make(kind)
    layer = coded_from_dense(dense, code)
    args = json.loads(json.dumps(layer_args(layer)))  # what the file keeps
    has_bias = getattr(layer, "bias", None) is not None
    rebuilt = coded_from_args(type(dense).__name__, args, CodedWeight.empty(code.layout), has_bias)
    assert type(rebuilt) is type(layer)
    rebuilt.load_state_dict(layer.state_dict())
    for path in ("decode", "lut"):
        assert torch.equal(run(rebuilt, x, path), run(layer, x, path)), path


@pytest.mark.parametrize("kind", ALL_CASES)
def test_no_dense_weight_is_held(kind):
    dense, code, _ = make(kind)
    layer = coded_from_dense(dense, code)
    n = dense.weight.numel()
    assert "weight" not in layer._parameters
    for name, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
        assert not (tensor.numel() == n and tensor.dtype == torch.float32), name
    stored = sum(t.numel() * t.element_size() for t in layer.weight_code.state_dict().values())
    assert stored < n * 4 / 2  # well under the dense float32 weight
    assert torch.equal(layer.weight, code.decode())  # the weight is decoded on demand


def test_forward_path_switching():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 32))
    model[0] = coded_from_dense(model[0], fit(model[0].weight, "kmeans", None, dim=4, k=16))
    model[1] = coded_from_dense(model[1], fit(model[1].weight, "kmeans", None, dim=4, k=16))
    assert model[1].forward_path == "auto" and model[0].forward_path == "lut"
    set_forward_path(model, "lut")
    assert model[1].forward_path == "lut" and model[0].forward_path == "lut"
    set_forward_path(model, "decode")
    assert model[1].forward_path == "decode" and model[0].forward_path == "lut"  # embeddings keep row lookup
    set_forward_path(model, "auto")
    assert model[1].forward_path == "auto"
    with pytest.raises(VQCError):
        set_forward_path(model, "fast")
    with pytest.raises(VQCError):
        model[1].set_forward_path("dense")


def test_auto_path_trains_through_the_decoded_weight():
    """With gradients the default path is torch's decode: codebooks and the input get gradients,
    and a few steps lower the loss."""
    dense, code, x = make("linear-rowscale-groups")
    layer = coded_from_dense(dense, code)
    layer.weight_code.start_training()
    target = dense(x).detach()
    x.requires_grad_(True)
    optimiser = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        optimiser.zero_grad()
        loss = (layer(x) - target).square().mean()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert layer.weight_code.codebook.grad is not None and x.grad is not None
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kind", ["conv1d", "conv2d-groups4-kept-rows"])
def test_unbatched_convolution_input(kind):
    dense, code, x = make(kind)
    layer = coded_from_dense(dense, code)
    for path in ("auto", "decode", "lut"):
        torch.testing.assert_close(run(layer, x[0], path), run(layer, x, path)[0], rtol=0, atol=1e-5)


def test_coded_from_dense_rejects_mismatched_code_and_max_norm():
    torch.manual_seed(0)
    code = fit(nn.Linear(32, 48).weight, "kmeans", 2)
    with pytest.raises(VQCError):
        coded_from_dense(nn.Linear(32, 40), code)
    emb = nn.Embedding(64, 16, max_norm=1.0)
    with pytest.raises(VQCError):
        coded_from_dense(emb, fit(emb.weight, "kmeans", None, dim=4, k=16))
    with pytest.raises(VQCError):
        coded_from_args("LSTM", {}, code, False)


def test_coded_layer_keeps_training_mode_and_bias():
    dense, code, _ = make("conv2d")
    dense.eval()
    layer = coded_from_dense(dense, code)
    assert not layer.training
    assert torch.equal(layer.bias, dense.bias)
    assert layer.bias.data_ptr() != 0 and not layer.bias.is_meta
    assert math.prod(layer.weight.shape) == dense.weight.numel()


@pytest.mark.parametrize("kind", ["linear-rtn", "linear-rowscale-groups", "conv1d-rtn-permuted", "conv2d-groups2-rtn",
                                  "embedding", "embedding-permuted", *HANDBUILT])
def test_empty_batch(kind):
    dense, code, x = make(kind)
    layer = coded_from_dense(dense, code)
    empty = x[:0]
    with torch.no_grad():
        expected = dense(empty).shape
        for path in ("decode", "lut"):
            assert run(layer, empty, path).shape == expected, path


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


@needs_cuda
@pytest.mark.parametrize("kind", ALL_CASES + HANDBUILT)
def test_on_cuda_both_paths_give_the_cpu_output(kind):
    dense, code, x = make(kind)
    layer = coded_from_dense(dense, code)
    on_cpu = run(layer, x, "decode")
    layer = layer.to("cuda")
    assert all(b.device.type == "cuda" for b in layer.buffers())
    for path in ("decode", "lut"):
        out = run(layer, x.to("cuda"), path)
        torch.testing.assert_close(out.cpu(), on_cpu, rtol=0, atol=1e-4 * on_cpu.abs().max().item())
