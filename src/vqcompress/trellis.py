"""The bitshift trellis (QTIP's trellis-coded quantization): 2 bits per weight with less error than
any 8-dimensional codebook.

A weight matrix is cut into tiles of ``TILE`` × ``TILE`` weights (16 rows × 16 inputs; the last
row block may have fewer rows), each one sequence, row after row (``split`` / ``join``), of states
of ``STATE_BITS`` (L = 16) bits; each weight shifts
K new bits in at the bottom (``SHIFT_BITS`` = 2 by default, up to 4: ``NEW_BITS``), so a state
overlaps its predecessor in L − K bits,
and the weight's value is ``values[state]``: a table of 2^L unit-Gaussian quantiles in a seeded
random order (fp16, like every codebook; weights of unit RMS, after the incoherence rotation
close to i.i.d. Gaussian, are coded as they are). Tail-biting: the first state's top bits are the
last state's low bits, so a tile is stored in exactly K bits per weight, its new bits only
(``new_bits``); memory holds the whole states (``states_from``), so decoding is a table lookup of
16-bit codes like any other coded weight (d = 1, k = 2^16). Tiles 16 inputs wide let calibrated
coding pass each column block's error on to the inputs after it (LDLQ, as QTIP does), and are
long enough (256 weights) that tail-biting costs little.

Coding a sequence is a Viterbi search over 2^16 states per weight (``encode``): compiled
(``kernels/trellis.cpp``), else the same search in torch, many times slower.
"""

from __future__ import annotations

import ctypes
import math
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from . import compiled

STATE_BITS, SHIFT_BITS = 16, 2
NEW_BITS = (2, 3, 4)  # the bits per weight a trellis can have (the compiled search's fast path)
K, DIM = 1 << STATE_BITS, 1
UNIT = 1.0  # table units per unit of RMS
SOURCE = Path(__file__).parent / "kernels" / "trellis.cpp"
SEAM = 64  # weights either side of a sequence's seam that the free first pass searches (as trellis.cpp)
TILE = 16  # a sequence: a tile of this many rows × this many inputs
TORCH_SEQUENCES = 8  # sequences searched at once by the torch search (its back-pointers: 4 MB each per 256 weights)


@lru_cache(maxsize=1)
def table(seed: int = 0) -> Tensor:
    """The 2^16 state values (2^16 × 1, float32, fp16-exact): unit-Gaussian quantiles, seeded order."""
    quantiles = (torch.randperm(K, generator=torch.Generator().manual_seed(seed)).double() + 0.5) / K
    return (math.sqrt(2) * torch.erfinv(2 * quantiles - 1)).half().float()[:, None]


def new_bits(states: Tensor, shift: int = SHIFT_BITS) -> Tensor:
    """What a row stores: each state's ``shift`` newest bits (the rest follows from its predecessors)."""
    return states & ((1 << shift) - 1)


def states_from(bits: Tensor, state_bits: int = STATE_BITS, shift: int = SHIFT_BITS) -> Tensor:
    """The states of tail-biting rows (…, length) from their new bits: state t holds the new bits of
    weights t, t − 1, … (cyclically), newest lowest."""
    bits = bits.to(torch.int64)
    states = sum(torch.roll(bits, i, -1) << (shift * i) for i in range(-(-state_bits // shift)))
    return states & ((1 << state_bits) - 1)


def split(matrix: Tensor) -> list[Tensor]:
    """The tile sequences of ``matrix`` (rows × cols, cols a multiple of ``TILE``), one matrix of
    sequences per tile height: the full tiles (…, 256) and those of the last, shorter row block."""
    rows, cols = matrix.shape
    full, rest = rows - rows % TILE, rows % TILE
    blocks = matrix[:full].reshape(full // TILE, TILE, cols // TILE, TILE).transpose(1, 2)
    parts = [blocks.reshape(-1, TILE * TILE)]
    if rest:
        parts.append(matrix[full:].reshape(rest, cols // TILE, TILE).transpose(0, 1).reshape(-1, rest * TILE))
    return [part for part in parts if len(part)]


def join(parts: list[Tensor], rows: int, cols: int) -> Tensor:
    """The inverse of ``split``: the matrix whose tile sequences are ``parts``."""
    full, rest = rows - rows % TILE, rows % TILE
    pieces = list(parts)
    head = pieces.pop(0).reshape(full // TILE, cols // TILE, TILE, TILE).transpose(1, 2).reshape(full, cols) if full else None
    tail = pieces.pop(0).reshape(cols // TILE, rest, TILE).transpose(0, 1).reshape(rest, cols) if rest else None
    return torch.cat([part for part in (head, tail) if part is not None])


def encode_tiles(matrix: Tensor, values: Tensor, importance: Tensor | None = None, shift: int = SHIFT_BITS) -> Tensor:
    """``encode`` of every tile of ``matrix`` (rows × cols, table units): the states, as ``matrix``."""
    rows, cols = matrix.shape
    weights = [None] * 2 if importance is None else split(importance.expand(rows, cols))
    return join([encode(part, values, w, shift=shift) for part, w in zip(split(matrix), weights)], rows, cols)


def states_of_tiles(bits: Tensor, state_bits: int = STATE_BITS, shift: int = SHIFT_BITS) -> Tensor:
    """``states_from`` of every tile of a matrix of new bits."""
    return join([states_from(part, state_bits, shift) for part in split(bits)], *bits.shape)


_library: ctypes.CDLL | None = None
_backend: str | None = None


def _lib() -> ctypes.CDLL | None:
    global _library, _backend
    if _backend is None:
        _library, _backend = compiled.load(SOURCE)
        if _library is not None:
            _library.vqc_trellis_encode.argtypes = [
                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    return _library


def backend() -> str:
    """How ``encode`` searches, in words: the compiled search or torch, and why."""
    _lib()
    return _backend


def encode(matrix: Tensor, values: Tensor, importance: Tensor | None = None,
           state_bits: int = STATE_BITS, shift: int = SHIFT_BITS) -> Tensor:
    """The tail-biting state sequence of each row of ``matrix`` (rows × length, table units) with the
    least squared error (each weight's weighed by ``importance``, same shape, when given), int64."""
    rows, length = matrix.shape
    if length * shift < state_bits:
        raise ValueError(f"a trellis sequence needs at least {-(-state_bits // shift)} weights, got {length}")
    x = matrix.detach().float().cpu().contiguous()
    w = None if importance is None else importance.detach().float().cpu().expand(rows, length).contiguous()
    values = values.detach().reshape(-1).float().cpu().contiguous()
    lib = _lib()
    if lib is None or not rows:
        return _encode_torch(x, values, w, state_bits, shift)
    states = torch.empty(rows, length, dtype=torch.int16)
    lib.vqc_trellis_encode(x.data_ptr(), None if w is None else w.data_ptr(), rows, length, values.data_ptr(),
                           state_bits, shift, states.data_ptr(), torch.get_num_threads())
    return states.to(torch.int64) & ((1 << state_bits) - 1)  # the uint16 states, read as int16


def _encode_torch(x: Tensor, values: Tensor, w: Tensor | None, state_bits: int, shift: int) -> Tensor:
    """``encode`` in torch: the free pass over each sequence's seam, then the tail-biting pass; a few
    sequences at a time."""
    if len(x) > TORCH_SEQUENCES:
        return torch.cat([_encode_torch(x[i:i + TORCH_SEQUENCES], values,
                                        None if w is None else w[i:i + TORCH_SEQUENCES], state_bits, shift)
                          for i in range(0, len(x), TORCH_SEQUENCES)])
    length = x.shape[1]
    before, after = min(length - length // 2, SEAM), min(length // 2, SEAM)
    seam = torch.cat([x[:, length - before:], x[:, :after]], 1)
    seam_w = None if w is None else torch.cat([w[:, length - before:], w[:, :after]], 1)
    overlap = viterbi(seam, values, state_bits, shift, seam_w)[:, before] >> shift
    return viterbi(x, values, state_bits, shift, w, overlap)


def viterbi(x: Tensor, values: Tensor, state_bits: int, shift: int, w: Tensor | None = None,
            overlap: Tensor | None = None) -> Tensor:
    """The least-error state sequences (S × T) of sequences ``x`` (S × T), errors weighed by ``w``;
    with ``overlap`` (S,), the first state's top bits and the last state's low bits are held to it."""
    sequences, length = x.shape
    w = torch.ones_like(x) if w is None else w
    low = 1 << (state_bits - shift)
    every = torch.arange(1 << state_bits)[None]
    cost = w[:, :1] * (x[:, :1] - values[None]) ** 2
    if overlap is not None:
        cost = torch.where((every >> shift) == overlap[:, None], cost, torch.full_like(cost, math.inf))
    back = torch.zeros(length, sequences, low, dtype=torch.uint8)
    for t in range(1, length):
        best, back[t] = cost.view(sequences, 1 << shift, low).min(1)
        cost = best.repeat_interleave(1 << shift, 1) + w[:, t:t + 1] * (x[:, t:t + 1] - values[None]) ** 2
    if overlap is not None:
        cost = torch.where((every & (low - 1)) == overlap[:, None], cost, torch.full_like(cost, math.inf))
    state = cost.argmin(1)
    path = torch.empty(sequences, length, dtype=torch.int64)
    path[:, -1] = state
    for t in range(length - 1, 0, -1):
        kept = state >> shift
        state = (back[t].gather(1, kept[:, None])[:, 0].long() << (state_bits - shift)) | kept
        path[:, t - 1] = state
    return path
