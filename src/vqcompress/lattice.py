"""E8P: a 2^16-point codebook in 8 dimensions from the E8 lattice (QuIP#'s "E8 padded"), with an
exact nearest-point search that never scans the 2^16 points.

The points are s ⊙ a ± 1/4: a one of 256 vectors of positive half-integers (the absolute values
of the points of D8 + 1/2 with an even sum and squared norm ≤ 10, 227 of them, and 29 of squared
norm 12: five 3/2 and three 1/2, taken in lexicographic order of where the 1/2 entries lie), s a
sign pattern with as many negative entries as makes s ⊙ a's sum even (so s ⊙ a ∈ D8 + 1/2, and
the point lies in E8 + 1/4), and the shift ±1/4. A 16-bit code is the index of a (8 bits), the
signs of entries 1–7 (7 bits; entry 0's follows from the parity) and the shift (1 bit).

Search (exact): for each shift and each a, the best signs are those of the point itself, unless
their parity is wrong, when the entry of least a_j |y_j| flips. The 227 vectors of norm ≤ 10 are
every arrangement of 7 multisets, and a multiset's best arrangement sorts as |y| sorts, so each
shift scores 7 multisets and the 29 other vectors (``_nearest_shifted``).

The table is scaled by ``UNIT`` so that weights of unit RMS (a row over its RMS, after the
incoherence rotation: close to i.i.d. Gaussian) are coded as they are.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from functools import lru_cache

import torch
from torch import Tensor

DIM, K = 8, 1 << 16
UNIT = 1.05  # lattice units per unit of RMS: where a unit Gaussian's relative error is least (docs/methods.md)
CHUNK = 8192  # points searched at a time
#: Codebooks searched by their structure, not by a scan: the sha256 of a codebook file holding this
#: table (``universal`` registers it when it opens one) → the search.
STRUCTURED: dict[str, Callable[[Tensor], Tensor]] = {}


@lru_cache(maxsize=1)
def absolute_grid() -> Tensor:
    """The 256 vectors a (256 × 8, float64, in half-integers)."""
    # every vector of positive half-integers of squared norm ≤ 10 is the absolute value of a point
    # of D8 + 1/2 with an even sum (turning one sign changes the sum's parity)
    half = torch.cartesian_prod(*[torch.tensor([0.5, 1.5, 2.5], dtype=torch.float64)] * DIM)
    small = torch.unique(half[half.square().sum(-1) <= 10], dim=0)
    twelve = []
    for halves in itertools.combinations(range(DIM), 3):
        row = torch.full((DIM,), 1.5, dtype=torch.float64)
        row[list(halves)] = 0.5
        twelve.append(row)
    grid = torch.cat([small, torch.stack(twelve[:256 - len(small)])])
    assert grid.shape == (256, DIM)
    return grid


def _odd_sums() -> Tensor:
    """Whether each a's sum is odd: then s ⊙ a needs an odd number of negative entries."""
    return (absolute_grid().sum(-1) % 2 == 1)


@lru_cache(maxsize=1)
def table() -> Tensor:
    """Every code's point, (2^16 × 8) float32, in units of RMS (divided by ``UNIT``)."""
    return decode(torch.arange(K)).float()


def decode(codes: Tensor) -> Tensor:
    """The points of 16-bit ``codes`` (any shape), (…, 8) float64 in units of RMS."""
    codes = codes.to(torch.int64)
    a = absolute_grid()[codes >> 8]
    negative = ((codes[..., None] >> torch.arange(1, DIM)) & 1).bool()  # bits 1..7: the signs of entries 1..7
    first = (negative.sum(-1) % 2 == 1) != _odd_sums()[codes >> 8]
    negative = torch.cat([first[..., None], negative], -1)
    shift = torch.where(codes & 1 == 1, 0.25, -0.25)
    return (torch.where(negative, -a, a) + shift[..., None]) / UNIT


@lru_cache(maxsize=1)
def kernel_tables() -> Tensor:
    """The codes' structure as the compiled kernel decodes it (kernels/lut.cpp, ``dot_e8p``), int32:
    X (256 × 8) by a code's low byte, H (256 × 8) by its high byte, then the 6 magnitudes (and 2 of
    padding) as fp32 bits. Entry e of a code is q/4 in lattice units, q = s_e·4a_e ± 1 odd, so its
    value is sign(q)·m[(|q| − 1)/2] with m the table's own (fp16-rounded) magnitudes; lane e of
    X ^ H holds sign(q) in bits 31 and 3 (one for a masked sign flip, one for a two-table permute)
    and (|q| − 1)/2 = (2a_e − 1) + [s_e agrees with the shift] in bits 0–2: X the signs by the low
    byte (entry 0's by the parity of entries 1–7) and whether each agrees with the shift bit, H
    2a − 1 and, where a's sum is odd, entry 0's sign turned."""
    low = torch.arange(256)
    negative = (low[:, None] >> torch.arange(1, DIM)) & 1
    negative = torch.cat([negative.sum(-1, keepdim=True) % 2, negative], -1)  # entry 0: the parity
    agrees = negative ^ (low[:, None] & 1)
    x = (negative << 31) | (negative << 3) | agrees
    h = (2 * absolute_grid() - 1).long()
    h[:, 0] |= _odd_sums().long() * ((1 << 31) | (1 << 3) | 1)
    magnitudes = (((2 * torch.arange(8, dtype=torch.float64) + 1) / 4) / UNIT).float().half().float()
    magnitudes[6:] = 0
    lanes = torch.cat([x.flatten(), h.flatten()]).to(torch.int64)
    lanes = torch.where(lanes >= 1 << 31, lanes - (1 << 32), lanes).to(torch.int32)
    return torch.cat([lanes, magnitudes.view(torch.int32)])


def nearest(points: Tensor) -> Tensor:
    """The code of the nearest point to each row of ``points`` (N × 8, units of RMS), int64."""
    points = points.reshape(-1, DIM)
    parts = [_nearest(part) for part in points.split(CHUNK)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=points.device)


@lru_cache(maxsize=1)
def _search_tables() -> tuple[Tensor, Tensor, Tensor]:
    """What the search reads: the sorted distinct multisets of the permutation-closed part of the
    grid (every permutation of each is in it), the rows outside it (the norm-12 ones, not all of
    their permutations), and each grid row's index by its entries read as base-3 digits."""
    grid = absolute_grid()
    closed = grid[grid.square().sum(-1) <= 10]
    multisets = torch.unique(closed.sort(-1).values, dim=0)
    digits = ((grid - 0.5) * 3 ** torch.arange(DIM, dtype=torch.float64)).sum(-1).long()
    lookup = torch.full((3**DIM,), -1, dtype=torch.int64)
    lookup[digits] = torch.arange(len(grid))
    return multisets.float(), grid[grid.square().sum(-1) > 10].float(), lookup


def _nearest(points: Tensor) -> Tensor:
    """The nearest point's code for one chunk: the better of the two shifts."""
    x = points.float() * UNIT
    (plus_score, plus_code), (minus_score, minus_code) = _nearest_shifted(x, 0.25, 1), _nearest_shifted(x, -0.25, 0)
    return torch.where(plus_score < minus_score, plus_code, minus_code)


def _nearest_shifted(x: Tensor, shift: float, bit: int) -> tuple[Tensor, Tensor]:
    """(squared distance, code) of the nearest point among those of one shift. The best arrangement
    of a multiset is the one sorted as |y| is; where its parity is wrong, the entry of least |y|
    flips (it holds the multiset's least entry, so the flip costs least there). The rows outside
    the closed part are scored one by one."""
    multisets, others, lookup = (t.to(x.device) for t in _search_tables())
    entries = torch.arange(DIM, device=x.device)
    y = x - shift
    magnitude, negative = y.abs(), y < 0
    odd = negative.sum(-1, keepdim=True) % 2 == 1
    ascending, order = magnitude.sort(-1)
    base = y.square().sum(-1, keepdim=True)
    wrong_sets = odd != (multisets.sum(-1) % 2 == 1)[None]
    set_scores = (base + multisets.square().sum(-1)[None] - 2 * ascending @ multisets.T
                  + 4 * wrong_sets * ascending[:, :1] * multisets[None, :, 0])
    products = magnitude[:, None, :] * others[None]
    least, flips = products.min(-1)
    wrong_others = odd != (others.sum(-1) % 2 == 1)[None]
    other_scores = base + others.square().sum(-1)[None] - 2 * products.sum(-1) + 4 * wrong_others * least
    score, choice = torch.cat([set_scores, other_scores], 1).min(-1)
    in_set, one_set, other = choice < len(multisets), choice.clamp(max=len(multisets) - 1), (choice - len(multisets)).clamp(min=0)
    a = torch.where(in_set[:, None], torch.empty_like(magnitude).scatter_(1, order, multisets[one_set]), others[other])
    flip = torch.where(in_set, order[:, 0], flips.gather(1, other[:, None])[:, 0])
    turned = torch.where(in_set, wrong_sets.gather(1, one_set[:, None])[:, 0], wrong_others.gather(1, other[:, None])[:, 0])
    signs = negative ^ (turned[:, None] & (entries[None] == flip[:, None]))
    index = lookup[((a - 0.5).round().long() * 3 ** entries).sum(-1)]
    return score, (index << 8) | (signs[:, 1:].long() << entries[1:]).sum(-1) | bit
