"""Tensors outside Linear / Conv / Embedding (an attention's in-projection, RNN weights, a converted
graph's constants) are coded, saved, loaded and counted like a layer's weight, and the module that
holds them computes with the decoded tensors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import vqcompress as vqc
from vqcompress import io
from vqcompress.compress import compress_with_summary
from vqcompress.layers import CodedLinear, CodedTensor, densify, iter_coded


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x)[0]


class Recurrent(nn.Module):
    def __init__(self, kind: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = kind(64, 64, num_layers=2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


MODELS = {"attention": Attention, "lstm": lambda: Recurrent(nn.LSTM), "gru": lambda: Recurrent(nn.GRU)}


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[kind]().eval()


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_attention_and_rnn_weights_are_coded_saved_and_loaded(tmp_path, kind, bits):
    """Every weight of ≥ 4,096 numbers is coded: the whole model near the budget (biases in fp32 and
    codebooks on top of the index bits; left dense, 32 bits per weight), the file loads into a fresh
    model to the same outputs, close to fp32 at 4 bits."""
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = build(kind)(x)
    model, summary = compress_with_summary(build(kind), "kmeans", bits=bits, progress=False)
    assert summary.left_dense == []
    coded = dict(iter_coded(model))
    assert len(coded) == {"attention": 2, "lstm": 4, "gru": 4}[kind]  # MHA: in_proj_weight and out_proj
    result = vqc.report(model)
    assert all(row.name.endswith(("_coded", "out_proj")) for row in result.coded)
    assert result.total_bits / result.parameters < bits + 1.5  # the tensors: codebooks and row scales on small layers
    with torch.no_grad():
        compressed = model(x)
    path = vqc.save(model, tmp_path / "m.vqc")
    assert vqc.report(path).total_bits == result.total_bits
    loaded = vqc.load(path, like=build(kind))
    with torch.no_grad():
        assert torch.equal(loaded(x), compressed)
    assert relative_error(compressed, expected) < (0.15 if bits == 4 else 0.5)  # random weights: ~0.1 at 4 bits


def test_the_attentions_output_projection_is_a_coded_linear():
    """``NonDynamicallyQuantizableLinear`` is a Linear with Linear's forward: it is coded as one."""
    model = vqc.compress(build("attention"), "kmeans", bits=4, progress=False)
    assert type(model.attn.out_proj) is CodedLinear
    assert isinstance(model.attn.in_proj_weight_coded, CodedTensor)
    assert "in_proj_weight" not in model.attn._parameters
    assert torch.equal(model.attn.in_proj_weight, model.attn.in_proj_weight_coded.weight_code.decode())


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_an_rnn_runs_on_its_decoded_weights_and_keeps_no_dense_copy(kind):
    """An RNN caches the tensors it runs with (``_flat_weights``): it must run with the decoded
    ones (the same outputs as a plain RNN given them), and not keep them between calls."""
    model = vqc.compress(build(kind), "kmeans", bits=2, progress=False)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2))
    decoded = {name: getattr(model.rnn, name) for name in model.rnn._flat_weights_names}
    plain = build(kind).rnn
    with torch.no_grad():
        got = model(x)
        expected = torch.func.functional_call(plain, decoded, (x,))[0]
    assert torch.equal(got, expected)
    assert not torch.equal(got, plain(x)[0])
    weights = dict(zip(model.rnn._flat_weights_names, model.rnn._flat_weights))
    assert weights["weight_ih_l0"] is None and weights["bias_ih_l0"] is not None  # decoded copies gone, biases kept
    with torch.no_grad():
        assert torch.equal(model(x), got)  # the next call reads them afresh


def test_a_transformer_layer_fast_path_reads_the_decoded_in_projection():
    """A TransformerEncoderLayer in eval mode reads its attention's weights itself (the fused
    fast path): it gets the decoded ones, the same outputs as the decompressed dense model."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True).eval()
    names = set(layer.state_dict())
    model = vqc.compress(layer, "kmeans", bits=4, progress=False)
    x = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(x)
        dense = densify(copy.deepcopy(model))
        assert torch.allclose(got, dense(x), atol=1e-5)
    assert not any(iter_coded(dense)) and type(dense.self_attn) is nn.MultiheadAttention
    assert set(dense.state_dict()) == names  # every tensor back under its own name


class Graph(nn.Module):
    """What onnx2torch makes of a MatMul by a constant: the constants are buffers of an
    ``initializers`` module that the traced graph reads."""

    def __init__(self) -> None:
        super().__init__()
        self.initializers = nn.Module()
        self.initializers.register_buffer("onnx_initializer_0", torch.randn(64, 128) / 8)
        self.initializers.register_buffer("onnx_initializer_1", torch.randn(128))
        mask = torch.zeros(64, 128)
        mask[:, 96:] = -torch.inf
        self.initializers.register_buffer("onnx_initializer_2", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.initializers.onnx_initializer_0 + self.initializers.onnx_initializer_1
        return (y[:, None] + self.initializers.onnx_initializer_2).softmax(-1).mean(1)


def traced() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return torch.fx.symbolic_trace(Graph())


def test_a_converted_graphs_constants_are_coded_and_a_mask_is_left_dense_and_listed(tmp_path):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = traced()(x)
    model, summary = compress_with_summary(traced(), "kmeans", bits=4, progress=False)
    assert [name for name, _ in iter_coded(model)] == ["initializers.onnx_initializer_0_coded"]
    assert [(e.name, e.reason) for e in summary.left_dense] == [
        ("initializers.onnx_initializer_2", "holds Inf or NaN values (a mask?)")]
    with torch.no_grad():
        got = model(x)
    assert relative_error(got, expected) < 0.15
    path = vqc.save(model, tmp_path / "graph.vqc")
    assert io.read_manifest(path)[0]["format_version"] >= 3  # readers of 2 know no held tensors
    loaded = vqc.load(path, like=traced())
    with torch.no_grad():
        assert torch.equal(loaded(x), got)
    dense = densify(loaded)
    assert "onnx_initializer_0" in dense.initializers._buffers  # a buffer again, decoded


def test_an_onnx_graph_converted_by_onnx2torch():
    """The real converter, where it is installed (it needs torchvision)."""
    onnx2torch = pytest.importorskip("onnx2torch")
    from onnx import TensorProto, helper, numpy_helper

    generator = np.random.default_rng(0)
    constants = [numpy_helper.from_array(generator.standard_normal(shape).astype(np.float32) / 8, name)
                 for name, shape in (("W", (64, 128)), ("B", (128,)), ("G", (32, 128)))]
    nodes = [helper.make_node("MatMul", ["X", "W"], ["Y"]), helper.make_node("Add", ["Y", "B"], ["Z"]),
             helper.make_node("Gemm", ["Z", "G"], ["O"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [4, 64])],
                              [helper.make_tensor_value_info("O", TensorProto.FLOAT, [4, 32])], constants)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = onnx2torch.convert(onnx_model)(x)
    model, summary = compress_with_summary(onnx2torch.convert(onnx_model), "kmeans", bits=4, progress=False)
    assert len(list(iter_coded(model))) == 2 and summary.left_dense == []  # the MatMul's constant and the Gemm
    with torch.no_grad():
        assert relative_error(model(x), expected) < 0.15
