"""The bitshift trellis: its tail-biting Viterbi search (compiled and torch), its stored new bits,
and its use as a universal codebook through vq4all, the file and the report."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vqcompress as vqc
from vqcompress import trellis, universal
from vqcompress.coded import CodedWeight, CodeLayout, file_streams, memory_streams
from vqcompress.errors import VQCError


def transitions_hold(states: torch.Tensor, state_bits: int, shift: int) -> bool:
    """Each state's top bits are its predecessor's low bits, the first's the last's (tail-biting)."""
    low = (1 << (state_bits - shift)) - 1
    return bool(((states >> shift) == (torch.roll(states, 1, -1) & low)).all())


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shift", [1, 2, 3, 4])
def test_the_compiled_search_finds_the_torch_search_s_paths(weighted, shift):
    if trellis._lib() is None:
        pytest.skip(f"no compiled search: {trellis.backend()}")
    gen = torch.Generator().manual_seed(0)
    values, x = torch.randn(256, generator=gen), torch.randn(24, 200, generator=gen)
    w = torch.rand(24, 200, generator=gen) if weighted else None
    compiled = trellis.encode(x, values, w, 8, shift)
    assert torch.equal(compiled, trellis._encode_torch(x, values, w, 8, shift))
    assert transitions_hold(compiled, 8, shift)
    assert torch.equal(trellis.states_from(trellis.new_bits(compiled, shift), 8, shift), compiled)


def test_without_a_compiler_the_torch_search_codes_the_same_rows(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    values, x = torch.randn(256, generator=gen), torch.randn(4, 40, generator=gen)
    compiled = trellis.encode(x, values, None, 8, 2)
    monkeypatch.setattr(trellis, "_lib", lambda: None)
    assert torch.equal(trellis.encode(x, values, None, 8, 2), compiled)


def test_a_row_is_its_new_bits_and_a_unit_gaussian_is_coded_below_the_8_dimensional_codebooks():
    x = torch.randn(16, 512, generator=torch.Generator().manual_seed(2))
    values = trellis.table()[:, 0]
    states = trellis.encode(x, values)
    assert transitions_hold(states, 16, 2)
    assert torch.equal(trellis.states_from(trellis.new_bits(states)), states)
    error = (values[states] - x).square().sum() / x.square().sum()
    assert 0.0625 < error < 0.072  # 2 bits per weight; E8P 0.091, the Gaussian limit 0.0625 (docs/methods.md)


def test_a_file_holds_two_bits_per_weight_and_restores_the_states_with_kept_rows():
    book = universal.open_codebook("trellis")
    layout = CodeLayout((12, 64), k=1 << 16, dim=1, scale_group=64, codebook_sha256=book.sha256, trellis=2)
    weight = torch.randn(12, 64, generator=torch.Generator().manual_seed(3))
    code = CodedWeight.encode(layout, universal.table(book.sha256), torch.zeros(12, 64, dtype=torch.int64),
                              weight.square().mean(1, keepdim=True).sqrt())
    code.reassign(weight)
    assert code.nbits() == 12 * 64 * 2 + 12 * 16
    code.keep_rows(weight, torch.tensor([1, 7]))
    decoded, buffers = code.decode(), dict(code.named_buffers())
    stored = file_streams(code.layout, buffers)
    assert stored["codes"].numel() * 8 == 12 * 64 * 2  # the tiles span the kept rows: their bits stay
    shell = CodedWeight.empty(code.layout)
    shell.load_state_dict({**buffers, **memory_streams(code.layout, {**buffers, **stored})})
    assert torch.equal(shell.decode(), decoded)


def test_a_trellis_layout_needs_one_dimension_and_inputs_in_whole_tiles():
    with pytest.raises(VQCError, match="trellis"):
        CodeLayout((4, 16), k=1 << 16, dim=2, trellis=2).validate()
    with pytest.raises(VQCError, match="inputs in multiples of 16"):
        CodeLayout((4, 24), k=1 << 16, dim=1, trellis=2).validate()


@pytest.mark.parametrize("rows, cols", [(32, 48), (37, 32), (5, 16), (16, 16)])
def test_tiles_are_16_by_16_sequences_row_after_row_and_join_gives_the_matrix_back(rows, cols):
    matrix = torch.arange(rows * cols).reshape(rows, cols)
    parts = trellis.split(matrix)
    assert torch.equal(trellis.join(parts, rows, cols), matrix)
    assert sum(p.numel() for p in parts) == rows * cols
    assert parts[0][0].tolist()[:18] == [*range(16), cols, cols + 1]  # a tile's first row, then its second


def test_error_feedback_lowers_a_layer_s_output_error_on_correlated_inputs():
    gen = torch.Generator().manual_seed(5)
    inputs = torch.randn(2048, 64, generator=gen) @ torch.randn(64, 64, generator=gen)
    gram = inputs.T @ inputs / len(inputs)
    weight = torch.randn(48, 64, generator=gen)
    book = universal.open_codebook("trellis")
    layout = CodeLayout((48, 64), k=1 << 16, dim=1, scale_group=64, codebook_sha256=book.sha256, trellis=2)

    def output_error(code: CodedWeight) -> float:
        delta = code.decode() - weight
        return float(torch.trace(delta @ gram @ delta.T) / torch.trace(weight @ gram @ weight.T))

    plain, fed = (CodedWeight.encode(layout, universal.table(book.sha256), torch.zeros(48, 64, dtype=torch.int64),
                                     weight.square().mean(1, keepdim=True).sqrt()) for _ in range(2))
    plain.reassign(weight)
    fed.reassign_with_feedback(weight, gram + 1e-2 * torch.eye(64) * gram.diag().mean())
    assert transitions_hold(trellis.split(fed.code_matrix().reshape(48, 64))[0], 16, 2)
    assert output_error(fed) < 0.8 * output_error(plain)  # measured 0.049 against 0.072


def test_vq4all_codes_a_model_with_the_trellis_and_the_file_gives_it_back(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 64))
    inputs = torch.randn(32, 256)
    coded = vqc.compress(copy.deepcopy(model), "vq4all", codebook="trellis", transform="hadamard",
                         calibration=[inputs], progress=False)
    assert coded[0].weight_code.layout.trellis == 2
    path = tmp_path / "trellis.vqc"
    vqc.save(coded, path)
    assert vqc.report(path).coded_bits_per_weight == pytest.approx(2 + 16 / 256)  # new bits and row scales
    loaded = vqc.load(path, like=copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), coded(inputs))
        error = (coded(inputs) - model(inputs)).norm() / model(inputs).norm()
    assert error < 0.4


@pytest.mark.parametrize("bits, new_bits", [(2.1, 2), (3.1, 3), (4.5, 4), (None, 2)])
def test_vq4all_s_trellis_takes_the_new_bits_its_budget_pays_for(bits, new_bits):
    from vqcompress.methods import get_method, make_config

    method = get_method("vq4all")
    settings = method.settings((64, 256), bits, make_config(method, {"codebook": "trellis"}))
    assert settings["trellis"] == new_bits
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(6))
    code = method.fit(weight, settings, 0)
    assert code.nbits() == 64 * 256 * new_bits + 64 * 16
    error = (code.decode() - weight).square().sum() / weight.square().sum()
    assert error < 2.0 ** (-2 * new_bits) * 1.25  # the Gaussian limit at that rate, and a little
