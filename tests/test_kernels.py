"""The compiled kernels: the lookup-table product and the decode-then-multiply path agree with the
decode path (the dense product with the decoded weight) on every coded layer type and layout, the
torch fallback is taken when asked or when the kernel cannot be built, and it says so."""

from __future__ import annotations

import os
import time
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import vqcompress as vqc
from tests.test_layers import HANDBUILT, MATMUL_CASES, assert_paths_agree, make
from vqcompress import kernels, layers
from vqcompress.coded import CodedWeight, CodeLayout
from vqcompress.layers import coded_from_dense, iter_coded, lut_matmul

needs_kernel = pytest.mark.skipif(kernels._lib() is None, reason=f"no compiled kernel: {kernels.backend()}")


@pytest.fixture(params=["table", "gather", "decode", "torch"])
def kernel_path(request, monkeypatch):
    """Every way a "lut" forward can go: the compiled table, the compiled decode-then-multiply,
    and the pure-torch fallback; the compiled ones are checked to be the ones that ran."""
    if request.param != "torch" and kernels._lib() is None:
        pytest.skip(f"no compiled kernel: {kernels.backend()}")
    compiled, real = [], kernels.lut_matmul

    def spy(*args):
        result = real(*args)
        compiled.append(result is not None)
        return result

    monkeypatch.setattr(kernels, "lut_matmul", spy)
    with kernels.forced(request.param):
        yield request.param
    assert compiled and all(compiled) == (request.param != "torch") and any(compiled) == all(compiled)


def coded(shape: tuple[int, ...], k: int, dim: int, groups: int = 1, scale_group: int | None = None,
          offset: bool = False, permuted: bool = False, gain: bool = False, seed: int = 0) -> CodedWeight:
    """Random codes of any width, with every optional part of the layout."""
    layout = CodeLayout(shape, k=k, dim=dim, groups=groups, scale_group=scale_group, offset=offset,
                        permuted=permuted, gain=gain)
    g = torch.Generator().manual_seed(seed)
    scales = (layout.rows, layout.cols // scale_group) if scale_group else None
    return CodedWeight.encode(
        layout, torch.randn(groups, k, dim, generator=g), torch.randint(0, k, (layout.rows, layout.segments), generator=g),
        torch.rand(*scales, generator=g) + 0.5 if scales else None,
        torch.randn(*scales, generator=g) * 0.1 if offset else None,
        torch.randperm(layout.rows, generator=g) if permuted else None,
        torch.tensor([1.5]) if gain else None)


def decoded_product(x: torch.Tensor, code: CodedWeight, input_groups: int) -> torch.Tensor:
    """The decode path's answer for (batch, input_groups, cols) inputs: each row block reads its group."""
    weight = code.decode().reshape(input_groups, code.layout.rows // input_groups, code.layout.cols)
    return torch.einsum("bjc,jrc->bjr", x, weight).reshape(x.shape[0], code.layout.rows)


def assert_close_to_decoded(x: torch.Tensor, code: CodedWeight, input_groups: int = 1) -> None:
    with torch.no_grad():
        expected, got = decoded_product(x, code, input_groups), lut_matmul(x, code, input_groups)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * max(1.0, expected.abs().max().item()))


@pytest.mark.parametrize("kind", MATMUL_CASES + HANDBUILT)
def test_every_layer_type_agrees_with_the_decode_path(kind, kernel_path):
    dense, code, x = make(kind)
    assert_paths_agree(coded_from_dense(dense, code), x)


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("batch", [1, 3])
def test_every_code_width(bits, batch, kernel_path):
    k = (1 << bits) - (bits > 2)  # not always a power of two: the width is what counts
    dim = 1 if bits > 12 else 2
    code = coded((24, 16), k, dim, scale_group=8, offset=bits % 2 == 1, permuted=bits % 3 == 0, gain=bits % 4 == 0,
                 seed=bits)
    assert code.layout.bits == bits
    assert_close_to_decoded(torch.randn(batch, 1, 16), code)


def test_a_permutation_of_more_than_65536_rows(kernel_path):
    """17-bit row numbers (70,000 rows): the kernel reads entries wider than a code's 16 bits."""
    code = coded((70000, 4), 16, 4, groups=4, scale_group=4, permuted=True)
    assert code.perm.numel() * 8 >= 70000 * 17
    assert_close_to_decoded(torch.randn(2, 1, 4), code)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 9), dim=st.sampled_from([1, 2, 3, 4]), groups=st.sampled_from([1, 2]),
       input_groups=st.sampled_from([1, 2, 4]), scale=st.sampled_from([None, "row", "block"]), offset=st.booleans(),
       permuted=st.booleans(), gain=st.booleans(), batch=st.integers(1, 5), table=st.booleans())
def test_any_layout_agrees_with_the_decode_path(bits, dim, groups, input_groups, scale, offset, permuted, gain, batch,
                                                table):
    cols = 12 * dim
    scale_group = {None: None, "row": cols, "block": 2 * dim}[scale]
    code = coded((8 * input_groups, cols), 1 << bits, dim, groups, scale_group, offset and scale is not None,
                  permuted, gain)
    with kernels.forced("table" if table else "decode"):
        assert_close_to_decoded(torch.randn(batch, input_groups, cols), code, input_groups)


@needs_kernel
def test_decode_then_multiply_goes_in_blocks_of_rows(monkeypatch):
    monkeypatch.setattr(kernels, "DECODE_BLOCK", 3 * 16)  # 3 rows a block: 17 blocks, the last one short
    code = coded((50, 16), 16, 2, scale_group=8, offset=True, permuted=True)
    with kernels.forced("decode"):
        assert_close_to_decoded(torch.randn(3, 1, 16), code)


@needs_kernel
@pytest.mark.parametrize("path", ["table", "decode"])
def test_the_kernel_ran_and_is_repeatable_whatever_the_threads(path, monkeypatch):
    code = coded((1024, 512), 256, 4, scale_group=64, offset=True)  # enough work for threads (PARALLEL_WORK)
    x = torch.randn(2, 1, 512)
    results = []
    with kernels.forced(path):
        for count in (1, 2, 3):
            monkeypatch.setattr(kernels, "threads", lambda count=count: count)
            results.append(kernels.lut_matmul(x, code))
    assert results[0] is not None and all(torch.equal(results[0], other) for other in results[1:])


def test_threads_leave_the_cores_other_processes_keep_busy(monkeypatch):
    """The last look is put one second back, with the cores since then busy (or not) with work
    that is not this process's: the next call takes one thread (or all torch allows)."""
    cpus = os.sched_getaffinity(0)
    busy = kernels.busy_seconds(cpus)
    if busy is None:
        pytest.skip("no /proc/stat here")
    for others, expected in ((len(cpus), 1), (0.0, min(torch.get_num_threads(), len(cpus)))):
        monkeypatch.setattr(kernels, "_look", (time.monotonic() - 1.0, busy - others, time.process_time()))
        assert kernels.threads() == expected
        assert kernels.threads() == expected  # until the next look, the same answer


@needs_kernel
def test_a_compressed_and_a_loaded_model_run_the_kernel_by_default(tmp_path, monkeypatch):
    """No ``set_forward_path``: the plain ``compress`` result and its reloaded file take the compiled
    kernel on the CPU (a Linear its product, a convolution its decode), and agree with "decode"."""
    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(16, 32, 3), nn.Flatten(), nn.Linear(32 * 6 * 6, 64))

    calls = []
    for name in ("lut_matmul", "decode"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *args, _real=real, _name=name: calls.append(_name) or _real(*args))
    x = torch.randn(2, 16, 8, 8)
    compressed = vqc.compress(net(), method="kmeans", bits=2)
    loaded = vqc.load(vqc.save(compressed, tmp_path / "m.vqc"), like=net())
    for model in (compressed, loaded):
        calls.clear()
        with torch.no_grad():
            auto = model(x)
        assert calls == ["decode", "lut_matmul"] and all(m.forward_path == "auto" for _, m in iter_coded(model))
        vqc.set_forward_path(model, "decode")
        with torch.no_grad():
            torch.testing.assert_close(auto, model(x), rtol=0, atol=1e-5)


def test_auto_takes_the_torch_table_product_only_where_it_is_faster(monkeypatch):
    """Where the kernel does not serve a call, "auto" runs torch's table product for one or two
    input vectors on the CPU without gradients, else torch's decode (docs/methods.md)."""
    tables, real = [], layers._table_product
    monkeypatch.setattr(layers, "_table_product", lambda *args: tables.append(args[0].shape[0]) or real(*args))
    dense, code, _ = make("linear-rowscale-groups")
    layer = coded_from_dense(dense, code)
    few, many = torch.randn(2, 32), torch.randn(3, 32)
    with torch.no_grad():
        expected = [layer(x) for x in (few, many)]  # the kernel, where there is one
    tables.clear()
    for x, out in zip((few, many), expected):
        torch.testing.assert_close(layer(x.clone().requires_grad_(True)), out, rtol=0, atol=1e-5)
    assert not tables  # gradients: decode
    with kernels.forced("torch"), torch.no_grad():
        for x, out in zip((few, many), expected):
            torch.testing.assert_close(layer(x), out, rtol=0, atol=1e-5)
    assert tables == [2]


def test_forced_fallback_is_reported_and_used(monkeypatch):
    monkeypatch.setenv(kernels.FORCE_TORCH, "torch")
    kernels.reset()
    try:
        assert kernels.backend().startswith("torch (forced")
        code = coded((16, 8), 16, 2)
        assert kernels.lut_matmul(torch.randn(1, 1, 8), code) is None
        assert_close_to_decoded(torch.randn(2, 1, 8), code)
    finally:
        monkeypatch.delenv(kernels.FORCE_TORCH)
        kernels.reset()


def test_a_failed_build_falls_back_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("VQC_CACHE", str(tmp_path))
    kernels.reset()
    try:
        assert kernels.backend().startswith("torch (the C++ kernel could not be built")
        assert_close_to_decoded(torch.randn(2, 1, 8), coded((16, 8), 16, 2))
    finally:
        monkeypatch.undo()
        kernels.reset()


def test_gradients_take_the_torch_path():
    code = coded((16, 8), 16, 2, scale_group=8)
    x = torch.randn(3, 1, 8, requires_grad=True)
    assert kernels.lut_matmul(x, code) is None
    lut_matmul(x, code).sum().backward()
    torch.testing.assert_close(x.grad, code.decode().sum(0).expand(3, 1, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", MATMUL_CASES + HANDBUILT)
def test_cuda_agrees_with_the_decode_path(kind):
    dense, code, x = make(kind)
    layer = coded_from_dense(dense, code).cuda()
    assert_paths_agree(layer, x.cuda())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_auto_path_decodes():
    dense, code, x = make("linear")
    layer = coded_from_dense(dense, code).cuda()
    assert_paths_agree(layer, x.cuda())
    with torch.no_grad():
        assert layer._path(x[:1].cuda(), 1) == "decode"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_layer_matches_the_cpu_kernel():
    code = coded((64, 32), 256, 4, scale_group=32, permuted=True)
    x = torch.randn(2, 1, 32)
    with torch.no_grad():
        on_cpu = lut_matmul(x, code)
        torch.testing.assert_close(lut_matmul(x.cuda(), code.cuda()).cpu(), on_cpu, rtol=0, atol=1e-4)  # moves code


@needs_kernel
@pytest.mark.parametrize("scale", [None, "row", "block"])
@pytest.mark.parametrize("e8p", [True, False])
def test_the_gather_agrees_with_the_decode_path(scale, e8p):
    """d = 8: E8P's codes decoded from their structure (exactly its fp16 table), and any codebook's
    gathered from the table, with every part of the layout."""
    from vqcompress import lattice, universal

    cols = 64
    scale_group = {None: None, "row": cols, "block": 16}[scale]
    code = coded((40, cols), 1 << 16, 8, scale_group=scale_group, offset=scale == "block", permuted=True, gain=True)
    if e8p:
        sha = universal.open_codebook("e8p").sha256
        code = CodedWeight.encode(replace(code.layout, codebook_sha256=sha), lattice.table().half()[None].float(),
                                  code.code_matrix(), code.scale if scale else None,
                                  code.offset if code.layout.offset else None, code.permutation(), code.gain)
    assert kernels.is_e8p(code) == e8p
    with kernels.forced("gather"):
        assert_close_to_decoded(torch.randn(3, 1, cols), code)


def test_the_e8p_tables_decode_every_code_to_the_table():
    from vqcompress import lattice

    tables = lattice.kernel_tables()
    low, high, magnitudes = tables[:2048].view(256, 8), tables[2048:4096].view(256, 8), tables[4096:].view(torch.float32)
    codes = torch.arange(1 << 16)
    lanes = low[codes & 255] ^ high[codes >> 8]
    decoded = magnitudes[(lanes & 7).long()] * torch.where(lanes < 0, -1.0, 1.0)
    assert torch.equal(decoded, lattice.table().half().float())


def test_a_large_codebook_gathers_at_small_batches():
    code = coded((4096, 4096), 1 << 16, 8, scale_group=4096)
    assert kernels.way(1, code) == "gather" and kernels.way(64, code) == "decode"
    assert kernels.way(1, coded((4096, 4096), 256, 4, scale_group=4096)) == "table"
