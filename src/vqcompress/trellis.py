"""The bitshift trellis (QTIP's trellis-coded quantization): 2 bits per weight with less error than
any 8-dimensional codebook.

A row of weights is one sequence of states of ``STATE_BITS`` (L = 16) bits; each weight shifts
``SHIFT_BITS`` (2) new bits in at the bottom, so a state overlaps its predecessor in L − 2 bits,
and the weight's value is ``values[state]``: a table of 2^L unit-Gaussian quantiles in a seeded
random order (fp16, like every codebook; weights of unit RMS, after the incoherence rotation
close to i.i.d. Gaussian, are coded as they are). Tail-biting: the first state's top bits are the
last state's low bits, so a row is stored in exactly 2 bits per weight, its new bits only
(``new_bits``); memory holds the whole states (``states_from``), so decoding is a table lookup of
16-bit codes like any other coded weight (d = 1, k = 2^16).

Coding a row is a Viterbi search over 2^16 states per weight (``encode``): compiled
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
K, DIM = 1 << STATE_BITS, 1
UNIT = 1.0  # table units per unit of RMS
SOURCE = Path(__file__).parent / "kernels" / "trellis.cpp"
SEAM = 64  # weights either side of a row's seam that the free first pass searches (as trellis.cpp)


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
    return sum(torch.roll(bits, i, -1) << (shift * i) for i in range(state_bits // shift))


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
        raise ValueError(f"a trellis row needs at least {state_bits // shift} weights, got {length}")
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
    """``encode`` in torch: the free pass over each row's seam, then the tail-biting pass."""
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
