"""CodedWeight and bit packing: exact round trips, hand-computed decodes, layout checks, storage counts."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vqcompress.coded as coded_module
from vqcompress.assign import LatentWeight
from vqcompress.coded import KEPT_DTYPES, CodedWeight, CodeLayout, code_bits, pack_codes, unpack_codes
from vqcompress.errors import VQCError

FAST = settings(max_examples=80, deadline=None)


# -- bit packing -----------------------------------------------------------------------------

@st.composite
def bits_and_codes(draw):
    bits = draw(st.integers(1, 32))  # codes up to 16 bits; a permutation's row numbers up to 32
    codes = draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=120))
    return bits, codes


def reference_pack(codes: list[int], bits: int) -> bytes:
    """Independent LSB-first packing: code i occupies bits [i·bits, (i+1)·bits) of one big integer."""
    value = 0
    for i, code in enumerate(codes):
        value |= code << (i * bits)
    return value.to_bytes((len(codes) * bits + 7) // 8, "little")


@FAST
@given(bits_and_codes())
def test_pack_unpack_round_trip(case):
    bits, codes = case
    packed = pack_codes(torch.tensor(codes, dtype=torch.int64), bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(len(codes) * bits / 8)
    assert bytes(packed.tolist()) == reference_pack(codes, bits)
    unpacked = unpack_codes(packed, bits, torch.arange(len(codes)))
    assert unpacked.tolist() == codes


@FAST
@given(bits_and_codes(), st.data())
def test_unpack_at_arbitrary_indices(case, data):
    bits, codes = case
    if not codes:
        codes = [(1 << bits) - 1]
    index = data.draw(st.lists(st.integers(0, len(codes) - 1), max_size=40))
    packed = pack_codes(torch.tensor(codes), bits)
    got = unpack_codes(packed, bits, torch.tensor(index, dtype=torch.int64))
    assert got.tolist() == [codes[i] for i in index]


def test_pack_known_bytes():
    # 3-bit codes 1, 2, 7 → bits (LSB first) 100 010 111 → byte0 = 0b11010001, byte1 = 0b1
    assert pack_codes(torch.tensor([1, 2, 7]), 3).tolist() == [0b11010001, 0b1]
    assert pack_codes(torch.tensor([0xABCD]), 16).tolist() == [0xCD, 0xAB]
    # 18 bits: 2^18 − 1 then 1 → eighteen ones, then a one at bit 18; 36 bits in 5 bytes
    assert pack_codes(torch.tensor([(1 << 18) - 1, 1]), 18).tolist() == [0xFF, 0xFF, 0b111, 0, 0]
    assert pack_codes(torch.tensor([0xDEADBEEF]), 32).tolist() == [0xEF, 0xBE, 0xAD, 0xDE]


@pytest.mark.parametrize("bits, codes", [(1, [2]), (3, [0, 8]), (8, [256]), (16, [1 << 16]), (4, [-1]),
                                         (18, [1 << 18]), (32, [1 << 32])])
def test_pack_rejects_codes_that_do_not_fit(bits, codes):
    with pytest.raises(ValueError):
        pack_codes(torch.tensor(codes), bits)


@pytest.mark.parametrize("bits", [0, 33, -1])
def test_pack_rejects_bad_widths(bits):
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([0]), bits)


@pytest.mark.parametrize("k, expected", [(2, 1), (3, 2), (4, 2), (5, 3), (255, 8), (256, 8), (257, 9), (65535, 16), (65536, 16)])
def test_code_bits_known(k, expected):
    assert code_bits(k) == expected


@FAST
@given(st.integers(2, 1 << 16))
def test_code_bits_is_ceil_log2(k):
    assert code_bits(k) == (k - 1).bit_length()  # = ceil(log2 k), computed without floats
    assert (1 << code_bits(k)) >= k > (1 << (code_bits(k) - 1))


def test_a_permutation_of_more_than_65536_rows_round_trips():
    """A row permutation of a 262,144-row embedding needs 18-bit row numbers; 70,000 rows need 17:
    encode, decode, row lookups, the empty shell a file loads into, and the bit count agree."""
    gen = torch.Generator().manual_seed(0)
    layout = CodeLayout((70000, 4), k=16, dim=4, groups=4, scale_group=4, permuted=True)
    perm = torch.randperm(70000, generator=gen)
    codebook, codes = torch.randn(4, 16, 4, generator=gen), torch.randint(0, 16, (70000, 1), generator=gen)
    scale = torch.rand(70000, 1, generator=gen) + 0.5
    code = CodedWeight.encode(layout, codebook, codes, scale, perm=perm)
    assert code.perm.numel() == math.ceil(70000 * 17 / 8)
    assert torch.equal(code.permutation(), perm)
    stored = codebook.half().float()[torch.arange(70000) // 17500, codes[:, 0]] * scale.half().float()
    expected = torch.empty(70000, 4).index_copy_(0, perm, stored)  # stored row r is original row perm[r]
    assert torch.equal(code.decode(), expected)
    rows = torch.tensor([69999, 0, 65536, 31337, 65535])
    assert torch.equal(code.decode_rows(rows), expected[rows])
    shell = CodedWeight.empty(layout)
    shell.load_state_dict(code.state_dict())
    assert torch.equal(shell.decode(), expected)
    assert code.nbits() == layout.nbits() == CodedWeight.empty(layout).nbits()


def test_a_permutation_needs_at_most_32_bit_row_numbers():
    with pytest.raises(VQCError, match="32-bit row numbers"):
        CodeLayout(((1 << 32) + 1, 1), k=2, dim=1, permuted=True).validate()


# -- decoding hand-built weights ---------------------------------------------------------------

CODEBOOK = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
CODES = torch.tensor([[0, 1], [1, 1]])


def test_decode_plain():
    code = CodedWeight.encode(CodeLayout((2, 4), k=2, dim=2), CODEBOOK, CODES)
    assert torch.equal(code.decode(), torch.tensor([[1.0, 2, 3, 4], [3, 4, 3, 4]]))


def test_decode_with_scale_and_offset():
    layout = CodeLayout((2, 4), k=2, dim=2, scale_group=2, offset=True)
    scale = torch.tensor([[1.0, 2.0], [3.0, 0.5]])
    offset = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    code = CodedWeight.encode(layout, CODEBOOK, CODES, scale, offset)
    assert torch.equal(code.decode(), torch.tensor([[1.0, 2, 7, 9], [8, 11, 1.5, 2]]))


def test_decode_with_row_scale_only():
    layout = CodeLayout((2, 4), k=2, dim=2, scale_group=4)
    code = CodedWeight.encode(layout, CODEBOOK, CODES, torch.tensor([2.0, -1.0]))
    assert torch.equal(code.decode(), torch.tensor([[2.0, 4, 6, 8], [-3, -4, -3, -4]]))


def test_decode_with_permutation():
    layout = CodeLayout((2, 4), k=2, dim=2, scale_group=2, offset=True, permuted=True)
    scale = torch.tensor([[1.0, 2.0], [3.0, 0.5]])
    offset = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    code = CodedWeight.encode(layout, CODEBOOK, CODES, scale, offset, perm=torch.tensor([1, 0]))
    # stored row r is original row perm[r]
    assert torch.equal(code.decode(), torch.tensor([[8.0, 11, 1.5, 2], [1, 2, 7, 9]]))


def test_decode_with_two_codebook_groups():
    layout = CodeLayout((4, 2), k=2, dim=2, groups=2)
    codebook = torch.tensor([[[1.0, 1.0], [2.0, 2.0]], [[10.0, 10.0], [20.0, 20.0]]])
    codes = torch.tensor([[0], [1], [0], [1]])
    code = CodedWeight.encode(layout, codebook, codes)
    assert torch.equal(code.decode(), torch.tensor([[1.0, 1], [2, 2], [10, 10], [20, 20]]))
    # groups follow the stored rows; the permutation then places them
    layout = CodeLayout((4, 2), k=2, dim=2, groups=2, permuted=True)
    code = CodedWeight.encode(layout, codebook, codes, perm=torch.tensor([2, 0, 3, 1]))
    assert torch.equal(code.decode(), torch.tensor([[2.0, 2], [20, 20], [1, 1], [10, 10]]))


def test_decode_conv_shape():
    layout = CodeLayout((2, 1, 2, 2), k=2, dim=2)
    code = CodedWeight.encode(layout, CODEBOOK, CODES)
    assert code.decode().shape == (2, 1, 2, 2)
    assert torch.equal(code.decode().reshape(2, 4), torch.tensor([[1.0, 2, 3, 4], [3, 4, 3, 4]]))


@st.composite
def random_codes(draw):
    """A random valid layout and its tensors, with values exactly representable in fp16."""
    groups = draw(st.integers(1, 3))
    rows = groups * draw(st.integers(1, 4))
    dim = draw(st.integers(1, 3))
    segments = draw(st.integers(1, 4))
    cols = dim * segments
    k = draw(st.integers(2, max(2, min(9, rows * segments // groups))))
    if rows * segments // groups < k:
        rows, groups = rows * k, 1
    divisors = [s * dim for s in range(1, segments + 1) if segments % s == 0]
    scale_group = draw(st.sampled_from([None, *divisors]))
    offset = scale_group is not None and draw(st.booleans())
    permuted = draw(st.booleans())
    layout = CodeLayout((rows, cols), k=k, dim=dim, groups=groups, scale_group=scale_group,
                        offset=offset, permuted=permuted)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    n_scales = cols // scale_group if scale_group else 0
    codebook = torch.randint(-16, 17, (groups, k, dim), generator=gen) / 4
    codes = torch.randint(0, k, (rows, segments), generator=gen)
    scale = torch.randint(-8, 9, (rows, n_scales), generator=gen) / 2 if scale_group else None
    off = torch.randint(-8, 9, (rows, n_scales), generator=gen) / 4 if offset else None
    perm = torch.randperm(rows, generator=gen) if permuted else None
    return layout, codebook, codes, scale, off, perm


def reference_decode(layout, codebook, codes, scale, offset, perm):
    rows, cols, dim = layout.rows, layout.cols, layout.dim
    out = torch.zeros(rows, cols)
    per_group = rows // layout.groups
    for r in range(rows):
        original = int(perm[r]) if perm is not None else r
        for c in range(cols):
            v = float(codebook[r // per_group, codes[r, c // dim], c % dim])
            if scale is not None:
                v = v * float(scale[r, c // layout.scale_group])
            if offset is not None:
                v = v + float(offset[r, c // layout.scale_group])
            out[original, c] = v
    return out


@FAST
@given(random_codes(), st.data())
def test_decode_matches_reference(case, data):
    layout, codebook, codes, scale, offset, perm = case
    code = CodedWeight.encode(layout, codebook, codes, scale, offset, perm)
    expected = reference_decode(*case)
    assert torch.equal(code.decode(), expected)
    rows = data.draw(st.lists(st.integers(0, layout.rows - 1), max_size=10))
    index = torch.tensor(rows, dtype=torch.int64)
    assert torch.equal(code.decode_rows(index), expected[index])


@FAST
@given(random_codes())
def test_empty_has_same_buffers_and_loads(case):
    layout = case[0]
    code = CodedWeight.encode(layout, *case[1:])
    shell = CodedWeight.empty(layout)
    got = {n: (tuple(b.shape), b.dtype) for n, b in shell.named_buffers()}
    want = {n: (tuple(b.shape), b.dtype) for n, b in code.named_buffers()}
    assert got == want
    shell.load_state_dict(code.state_dict())
    assert torch.equal(shell.decode(), code.decode())
    assert shell.nbits() == code.nbits()


# -- storage cost ------------------------------------------------------------------------------

@FAST
@given(random_codes())
def test_nbits_is_every_stored_byte(case):
    code = CodedWeight.encode(case[0], *case[1:])
    assert code.nbits() == 8 * sum(t.numel() * t.element_size() for t in code.state_dict().values())
    assert case[0].nbits() == code.nbits()  # known from the layout alone


def test_nbits_hand_count():
    layout = CodeLayout((64, 32), k=256, dim=4, groups=2, scale_group=32, permuted=True)
    code = CodedWeight.encode(layout, torch.randn(2, 256, 4), torch.randint(0, 256, (64, 8)),
                              torch.rand(64, 1), perm=torch.randperm(64))
    codebook = 2 * 256 * 4 * 16   # fp16
    codes = 64 * 8 * 8            # 512 codes of 8 bits
    scales = 64 * 16              # one fp16 per row
    perm = 64 * 6                 # packed at ceil(log2 64) bits per row
    assert code.nbits() == codebook + codes + scales + perm == 38272


def test_nbits_hand_count_odd_width():
    layout = CodeLayout((5, 6), k=8, dim=2)  # 15 codes × 3 bits = 45 bits → 6 bytes
    code = CodedWeight.encode(layout, torch.randn(8, 2), torch.randint(0, 8, (5, 3)))
    assert code.codes.numel() == 6
    assert code.nbits() == 8 * 2 * 16 + 6 * 8


# -- layout validation -------------------------------------------------------------------------

@pytest.mark.parametrize("layout", [
    CodeLayout((4, 6), k=2, dim=4),                       # d does not divide cols
    CodeLayout((4, 8), k=2, dim=0),                       # d = 0
    CodeLayout((4, 8), k=2, dim=1, scale_group=0),        # scale group = 0
    CodeLayout((4, 8), k=2, dim=1, offset=True),          # offsets without scales
    CodeLayout((4, 8), k=2, dim=2, groups=3),             # groups do not divide rows
    CodeLayout((64, 64), k=1, dim=1),                     # k < 2
    CodeLayout((64, 64), k=0, dim=1),
    CodeLayout((70000, 1), k=65537, dim=1),               # k > 2^16
    CodeLayout((4, 6), k=2, dim=2, scale_group=3),        # scale group not a multiple of d
    CodeLayout((4, 6), k=2, dim=2, scale_group=4),        # scale group does not divide cols
    CodeLayout((8,), k=2, dim=1),                         # not a matrix
], ids=str)
def test_validate_rejects(layout):
    with pytest.raises(VQCError):
        layout.validate()
    with pytest.raises(VQCError):
        CodedWeight.empty(layout)


@pytest.mark.parametrize("layout", [
    CodeLayout((4, 8), k=8, dim=4),
    CodeLayout((4, 8), k=4, dim=4, groups=2),
    CodeLayout((64, 64), k=2, dim=1),
    CodeLayout((70000, 1), k=65536, dim=1),
    CodeLayout((4, 6), k=2, dim=2, scale_group=6),
    CodeLayout((4, 3, 2, 2), k=4, dim=2, scale_group=4, offset=True, permuted=True),
], ids=str)
def test_validate_accepts(layout):
    layout.validate()


def test_layout_json_round_trip():
    layout = CodeLayout((4, 3, 2, 2), k=4, dim=2, scale_group=4, offset=True, permuted=True)
    assert CodeLayout.from_json(layout.to_json()) == layout


def test_decode_no_rows():
    layout = CodeLayout((2, 4), k=2, dim=2, scale_group=2, offset=True, permuted=True)
    code = CodedWeight.encode(layout, CODEBOOK, CODES, torch.ones(2, 2), torch.zeros(2, 2), perm=torch.tensor([1, 0]))
    assert code.decode_rows(torch.tensor([], dtype=torch.int64)).shape == (0, 4)


def trained_code(temperature: float) -> tuple[CodedWeight, torch.Tensor]:
    """A weight with two codebook groups, scales, offsets, a permutation and a gain, training with a latent."""
    gen = torch.Generator().manual_seed(0)
    layout = CodeLayout((8, 12), k=5, dim=3, groups=2, scale_group=6, offset=True, permuted=True, gain=True)
    code = CodedWeight.encode(layout, torch.randn(2, 5, 3, generator=gen), torch.randint(0, 5, (8, 4), generator=gen),
                              torch.rand(8, 2, generator=gen) + 0.5, torch.randn(8, 2, generator=gen) / 4,
                              torch.randperm(8, generator=gen), torch.tensor([1.5]))
    latent = torch.randn(8, 12, generator=gen)
    code.start_training()
    code.assigner = LatentWeight(latent)
    code.assigner.temperature = temperature
    return code, latent


def test_cold_soft_assignment_is_the_nearest_codeword():
    code, latent = trained_code(temperature=1e-4)
    soft = code.decode().detach()
    code.reassign(latent)
    code.assigner.temperature = None
    assert torch.allclose(soft, code.decode().detach(), atol=1e-5)
    assert not torch.allclose(soft, latent, atol=1e-2)  # it is the quantized weight, not the latent one


def test_warm_soft_assignment_trains_latent_and_codebook():
    code, latent = trained_code(temperature=1.0)
    code.decode().square().sum().backward()
    assert code.assigner.latent.grad.abs().sum() > 0 and code.codebook.grad.abs().sum() > 0
    code.assigner.temperature = 1e-4
    assert not torch.allclose(code.decode(), trained_code(1.0)[0].decode())  # warm mixes, cold picks


# -- the factor form ------------------------------------------------------------------------------

FACTOR_FORMS = [  # (terms, coefficient bits, codebook bits, k): index and mask positions, grids, fp16
    (2, 3, 0, 16), (5, 16, 6, 8), (1, 2, 4, 256), (3, 0, 0, 8), (6, 1, 3, 8),
]


def _factored(shape: tuple[int, ...], terms: int, coef_bits: int, codebook_bits: int, k: int,
              seed: int = 0) -> tuple[CodedWeight, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    cols = math.prod(shape[1:])
    layout = CodeLayout(shape, k=k, dim=4, scale_group=cols, terms=terms, coef_bits=coef_bits, codebook_bits=codebook_bits)
    positions = torch.stack([torch.randperm(k)[:terms] for _ in range(layout.rows * layout.segments)])
    coefficients = torch.randn(len(positions), terms) * 3
    code = CodedWeight.encode(layout, torch.randn(1, k, 4), positions.reshape(layout.rows, layout.segments, terms),
                              torch.rand(layout.rows) + 0.5, coefficients=coefficients)
    return code, positions, coefficients


@pytest.mark.parametrize("form", FACTOR_FORMS)
def test_factor_form_stores_what_it_was_given(form):
    terms, coef_bits, codebook_bits, k = form
    code, positions, coefficients = _factored((12, 16), *form)
    order = positions.argsort(-1)
    assert torch.equal(code.positions().reshape(-1, terms), positions.gather(1, order))
    stored = code.coefficients().reshape(-1, terms)
    given = coefficients.gather(1, order)
    if coef_bits == 16:
        assert torch.equal(stored, given.half().float())
    elif coef_bits:  # the nearest odd multiple within the grid
        top = 2**coef_bits - 1
        assert torch.equal(stored, (2 * torch.round((given.clamp(-top, top) + top) / 2) - top))
    else:
        assert torch.equal(stored, torch.ones_like(stored))
    if codebook_bits:
        levels = code.codebook / code.codebook_scale.float()
        assert torch.equal(levels, levels.round()) and levels.abs().max() <= 2**codebook_bits - 1
    assert code.layout.masked == (terms * code.layout.bits > k)


@pytest.mark.parametrize("form", FACTOR_FORMS)
def test_factor_form_round_trips_and_counts_every_stored_byte(form):
    code, _, _ = _factored((12, 16), *form)
    state = {name: tensor.clone() for name, tensor in code.state_dict().items()}
    assert "codebook" not in state if form[2] else "codebook" in state  # a grid codebook is its levels
    shell = CodedWeight.empty(code.layout)
    assert {n: (t.shape, t.dtype) for n, t in shell.state_dict().items()} == {n: (t.shape, t.dtype) for n, t in state.items()}
    shell.load_state_dict(state)
    assert torch.equal(shell.decode(), code.decode())
    assert code.nbits() == sum(t.numel() * t.element_size() * 8 for t in state.values()) == code.layout.nbits()


@pytest.mark.parametrize("form", FACTOR_FORMS)
def test_factor_form_trains_through_its_grids_and_lands_back_on_them(form):
    code, _, _ = _factored((12, 16), *form)
    target = code.decode() + 0.1 * torch.randn(12, 16)
    code.start_training()
    optimiser = torch.optim.Adam(code.parameters(), lr=1e-3)
    before = (code.decode() - target).square().sum()
    for _ in range(20):
        optimiser.zero_grad()
        loss = (code.decode() - target).square().sum()
        loss.backward()
        optimiser.step()
    trained = code.decode().detach()
    code.finish_training()
    assert not list(code.parameters())
    assert torch.allclose(code.decode(), trained, atol=1e-2 * trained.abs().max())
    assert (code.decode() - target).square().sum() < before
    shell = CodedWeight.empty(code.layout)
    shell.load_state_dict(code.state_dict())
    assert torch.equal(shell.decode(), code.decode())


def _full_featured_code() -> tuple[CodedWeight, torch.Tensor]:
    """Two codebook groups, scales and offsets per half row, a permutation and a gain; a weight near it."""
    gen = torch.Generator().manual_seed(1)
    layout = CodeLayout((16, 12), k=6, dim=3, groups=2, scale_group=6, offset=True, permuted=True, gain=True)
    code = CodedWeight.encode(layout, torch.randn(2, 6, 3, generator=gen), torch.randint(0, 6, (16, 4), generator=gen),
                              torch.rand(16, 2, generator=gen) + 0.5, torch.randn(16, 2, generator=gen) / 4,
                              torch.randperm(16, generator=gen), torch.tensor([1.5]))
    return code, code.decode() + 0.3 * torch.randn(16, 12, generator=gen)


def test_feedback_with_uncorrelated_equal_inputs_is_the_nearest_codeword():
    code, weight = _full_featured_code()
    code.reassign(weight)
    nearest = code.codes.clone()
    code.reassign_with_feedback(weight, torch.eye(12))
    assert torch.equal(code.codes, nearest)


def test_feedback_lowers_the_output_error_on_correlated_inputs():
    from vqcompress.calibrate import InputStatistics

    code, weight = _full_featured_code()
    gen = torch.Generator().manual_seed(2)
    mixing = torch.eye(12) + 0.8 * torch.randn(12, 12, generator=gen)
    inputs = torch.randn(2000, 12, generator=gen) @ mixing
    stats = InputStatistics(gram=inputs.T @ inputs / len(inputs)).damped(0.01)
    code.reassign(weight, stats.importance())
    weighted = float(stats.error(weight - code.decode()))
    code.reassign_with_feedback(weight, stats.gram)
    assert float(stats.error(weight - code.decode())) < 0.9 * weighted


@pytest.mark.parametrize("dtype", KEPT_DTYPES)
def test_kept_rows_decode_as_stored_everywhere_and_are_counted(dtype):
    """Kept rows decode to their stored values (whole decode, row lookups, the lookup-table
    product in torch and compiled): fp16 exactly, int8 within half a step of its row's grid;
    the others as coded; every stored byte is counted, also in the layout before any fitting,
    and an empty shell of the layout loads them."""
    from vqcompress import kernels
    from vqcompress.layers import lut_matmul

    code, weight = _full_featured_code()
    coded = code.decode()
    code.keep_rows(weight, torch.tensor([9, 2, 14]), dtype)
    decoded = code.decode()
    kept = weight[[2, 9, 14]]
    if dtype == "float16":
        assert torch.equal(decoded[[2, 9, 14]], kept.half().float())
    else:
        step = kept.abs().amax(1, keepdim=True) / 127
        assert ((decoded[[2, 9, 14]] - kept).abs() <= step * 0.502).all()
        assert code.layout.kept_bits() == 3 * (12 * 8 + 16 + 32)
    others = [r for r in range(16) if r not in (2, 9, 14)]
    assert torch.equal(decoded[others], coded[others])
    assert torch.equal(code.decode_rows(torch.tensor([14, 3, 2])), decoded[[14, 3, 2]])
    assert code.layout.kept_rows == 3 and code.nbits() == code.layout.nbits()
    assert code.nbits() == CodedWeight.empty(code.layout).nbits()
    x = torch.randn(5, 1, 12)
    for path in ("torch", "table", "decode"):
        with kernels.forced(path):
            assert torch.allclose(lut_matmul(x, code), x[:, 0] @ decoded.T, atol=1e-4)
    shell = CodedWeight.empty(CodeLayout.from_json(code.layout.to_json()))
    shell.load_state_dict(code.state_dict())
    assert torch.equal(shell.decode(), decoded)


@pytest.mark.parametrize("form", ["plain", "indices", "mask", "fp16"])
def test_a_files_row_streams_leave_the_kept_rows_out_and_come_back_decoding_the_same(form):
    """Codes and coefficients of kept rows are never read: the stored streams drop them (the bit
    count with them), and restoring the streams gives a weight that decodes the same."""
    from vqcompress.coded import file_streams, memory_streams

    gen = torch.Generator().manual_seed(3)
    settings = {"plain": {}, "indices": {"terms": 2, "coef_bits": 3}, "mask": {"terms": 3, "coef_bits": 2},
                "fp16": {"terms": 2, "coef_bits": 16}}[form]
    layout = CodeLayout((16, 12), k=4, dim=3, scale_group=12, permuted=True, **settings)
    assert layout.masked == (form == "mask")
    terms = layout.terms
    positions = torch.stack([torch.randperm(4, generator=gen)[:terms] for _ in range(16 * 4)]).reshape(16, 4, terms)
    code = CodedWeight.encode(layout, torch.randn(4, 3, generator=gen), positions if layout.factored else positions[..., 0],
                              torch.rand(16, 1, generator=gen) + 0.5, perm=torch.randperm(16, generator=gen),
                              coefficients=torch.randint(-3, 4, positions.shape, generator=gen).float() * 2 + 1)
    weight = code.decode() + 0.1
    full_bits = code.nbits()
    code.keep_rows(weight, torch.tensor([0, 5, 11]))
    decoded, buffers = code.decode(), dict(code.named_buffers())
    stored = file_streams(code.layout, buffers)
    for name in code.layout.row_streams():
        assert stored[name].numel() * stored[name].element_size() * 8 == code.layout.stream_bits()[name]
    left_out = sum(buffers[n].numel() * buffers[n].element_size() * 8 for n in stored) - sum(code.layout.stream_bits().values())
    assert code.nbits() == code.layout.nbits() == full_bits + code.layout.kept_bits() - left_out and left_out > 0
    shell = CodedWeight.empty(code.layout)
    shell.load_state_dict({**buffers, **memory_streams(code.layout, {**buffers, **stored})})
    assert torch.equal(shell.decode(), decoded)


def test_kept_rows_beyond_the_weight_are_refused():
    with pytest.raises(VQCError, match="kept rows"):
        CodeLayout((4, 8), k=4, dim=2, kept_rows=5).validate()
    with pytest.raises(VQCError, match="kept rows are stored as"):
        CodeLayout((4, 8), k=4, dim=2, kept_rows=1, kept_dtype="int4").validate()


def test_a_layout_records_only_what_differs_from_its_defaults():
    layout = CodeLayout((4, 8), k=4, dim=2, kept_rows=1, scale_group=8)
    assert layout.to_json() == {"shape": (4, 8), "k": 4, "dim": 2, "kept_rows": 1, "scale_group": 8}
    assert CodeLayout.from_json(layout.to_json()) == layout


def test_kept_rows_of_a_table_too_tall_for_packed_row_numbers():
    """Gemma's 262,144 token rows need 18-bit row numbers: kept rows still work there."""
    layout = CodeLayout((1 << 17, 2), k=2, dim=2)
    code = CodedWeight.encode(layout, torch.zeros(1, 2, 2), torch.zeros(1 << 17, 1, dtype=torch.int64))
    weight = torch.randn(1 << 17, 2)
    code.keep_rows(weight, torch.tensor([(1 << 17) - 1, 3]), "float16")
    assert torch.equal(code.decode()[[3, (1 << 17) - 1]], weight[[3, (1 << 17) - 1]].half().float())
    assert code.nbits() == code.layout.nbits() == CodedWeight.empty(code.layout).nbits()


def test_kept_rows_in_a_grouped_product_read_their_own_input_group():
    from vqcompress import kernels
    from vqcompress.layers import lut_matmul

    code, weight = _full_featured_code()
    code.keep_rows(weight, torch.tensor([1, 12]))
    decoded = code.decode()
    x = torch.randn(5, 2, 12)
    reference = torch.cat([x[:, 0] @ decoded[:8].T, x[:, 1] @ decoded[8:].T], dim=1)
    with kernels.forced("torch"):
        assert torch.allclose(lut_matmul(x, code, input_groups=2), reference, atol=1e-4)


@pytest.mark.parametrize("bits", [1, 3, 5, 8, 11, 16])
def test_packing_in_slices_gives_the_same_stream(bits, monkeypatch):
    codes = torch.randint(0, 2**bits, (1000,), generator=torch.Generator().manual_seed(bits))
    whole = pack_codes(codes, bits)
    monkeypatch.setattr(coded_module, "PACK_SLICE", 64)
    sliced = pack_codes(codes, bits)
    assert torch.equal(sliced, whole) and len(sliced) == (1000 * bits + 7) // 8
    assert torch.equal(unpack_codes(sliced, bits, torch.arange(1000)), codes)


@pytest.mark.parametrize("weighted", [False, True])
def test_reassigning_in_slices_of_rows_gives_the_same_codes(weighted, monkeypatch):
    """Slices of rows that cut across codebook groups, a permutation and per-weight importance."""
    g = torch.Generator().manual_seed(4)
    layout = CodeLayout((60, 12), k=8, dim=3, groups=3, scale_group=12, permuted=True)
    code = CodedWeight.encode(layout, torch.randn(3, 8, 3, generator=g), torch.zeros(60, 4, dtype=torch.int64),
                              torch.rand(60, 1, generator=g) + 0.5, perm=torch.randperm(60, generator=g))
    weight = torch.randn(60, 12, generator=g)
    importance = torch.rand(60, 12, generator=g) if weighted else None
    code.reassign(weight, importance)
    whole = code.codes.clone()
    assert code.code_matrix().unique().numel() > 4  # real choices, not the zeros it started from
    monkeypatch.setattr(coded_module, "SLICE_WEIGHTS", 12 * 8)  # 8 rows a slice: 20 rows per group
    code.reassign(weight, importance)
    assert torch.equal(code.codes, whole)
