"""Incoherence processing: a layer's weight coded in a seeded random orthogonal basis (QuIP#'s
randomised Hadamard transform), so that its entries are close to i.i.d. Gaussian and its outliers
spread out, and one codebook suits every layer.

The coded weight holds W' = R W Cᵀ: C mixes the inputs, R the outputs (rows). Each side is
T = (Q ⊗ H / √2^a) · diag(s) for a size n = m · 2^a with m odd: s random signs, H the 2^a × 2^a
Walsh–Hadamard matrix (applied by the fast transform, O(n log n)), Q a random orthogonal m × m
block (the identity when n is a power of two; m = 3 for MiniLM's 384, 5 for Gemma's 640), so any
size is served without padding. The layer computes y = Rᵀ (W' (C x)): its input is transformed the
same way, its output transformed back. A rotation is its seed and its sides: it costs no bits.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from scipy.linalg import hadamard
from torch import Tensor, nn

from .errors import VQCError


def _odd_part(n: int) -> tuple[int, int]:
    """(m, a) with n = m · 2^a, m odd."""
    a = (n & -n).bit_length() - 1
    return n >> a, a


class Transform(nn.Module):
    """One side's orthogonal transform T of size ``n`` from ``seed``, applied along a tensor's last
    dimension; its tensors are derived from the seed, never stored."""

    def __init__(self, n: int, seed: int):
        super().__init__()
        self.n, (self.m, self.a) = n, _odd_part(n)
        generator = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
        block = torch.linalg.qr(torch.randn(self.m, self.m, generator=generator, dtype=torch.float64))
        block = block.Q * block.R.diagonal().sign()  # Haar-distributed: columns' signs fixed by R's diagonal
        self.register_buffer("signs", signs.float(), persistent=False)
        self.register_buffer("block", block.float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """T x along the last dimension."""
        return self._mix(x * self.signs.to(x), self.block)

    def inverse(self, x: Tensor) -> Tensor:
        """Tᵀ x along the last dimension."""
        return self._mix(x, self.block.T) * self.signs.to(x)

    def _mix(self, x: Tensor, block: Tensor) -> Tensor:
        """(block ⊗ H / √2^a) x: the Walsh–Hadamard transform on blocks of 2^a as a product of small
        ones (H of 2^a is the Kronecker product of H of its factors: one small matrix product per
        factor instead of a step per bit), then the odd block."""
        shape, factors = x.shape, [1 << min(FACTOR_BITS, self.a - i) for i in range(0, self.a, FACTOR_BITS)]
        x = x.reshape(-1, self.m, *factors)
        for axis, size in enumerate(factors, start=2):
            x = (x.movedim(axis, -1) @ _sylvester(size).to(x)).movedim(-1, axis)
        x = x.reshape(-1, self.m, 1 << self.a) * 2 ** (-self.a / 2)
        if self.m > 1:
            x = torch.einsum("ij,bjk->bik", block.to(x), x)
        return x.reshape(shape)


FACTOR_BITS = 6  # the largest Hadamard factor, 64 × 64: O(n · 64 · a / 6) multiply-adds, few calls


@lru_cache(maxsize=None)
def _sylvester(size: int) -> Tensor:
    """The size × size Walsh–Hadamard matrix of ±1 (Sylvester's, symmetric)."""
    return torch.from_numpy(hadamard(size)).float()


class Rotation(nn.Module):
    """The transforms of one coded layer: over its ``cols`` inputs always, over its ``rows`` outputs
    where the layer allows it (``layers.rotates_rows``)."""

    def __init__(self, rows: int, cols: int, seed: int, mix_rows: bool):
        super().__init__()
        self.seed, self.shape = seed, (rows, cols)
        self.cols = Transform(cols, 2 * seed)
        self.rows = Transform(rows, 2 * seed + 1) if mix_rows else None

    # -- the weight ----------------------------------------------------------------------------

    def to_stored(self, weight: Tensor) -> Tensor:
        """W' = R W Cᵀ, for a weight of any shape whose first dimension is the rows."""
        matrix = self.cols(weight.reshape(self.shape))
        if self.rows is not None:
            matrix = self.rows(matrix.T).T
        return matrix.reshape(weight.shape)

    def from_stored(self, stored: Tensor) -> Tensor:
        """W = Rᵀ W' C: the weight in its own basis."""
        matrix = stored.reshape(self.shape)
        if self.rows is not None:
            matrix = self.rows.inverse(matrix.T).T
        return self.cols.inverse(matrix).reshape(stored.shape)

    def rows_from_stored(self, rows: Tensor) -> Tensor:
        """Some rows of W' as the same rows of W: for an embedding, whose outputs are never mixed
        (``layers.rotates_rows``)."""
        return self.cols.inverse(rows)

    # -- the layer's inputs and outputs --------------------------------------------------------

    def inputs(self, x: Tensor) -> Tensor:
        """C x: an input as the stored weight reads it."""
        return self.cols(x)

    def outputs(self, y: Tensor) -> Tensor:
        """Rᵀ y: the stored weight's output in the layer's own basis."""
        return y if self.rows is None else self.rows.inverse(y)

    # -- the file ------------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {"kind": "hadamard", "seed": self.seed, "rows": self.rows is not None}

    @classmethod
    def from_json(cls, entry: dict, rows: int, cols: int) -> Rotation:
        known = isinstance(entry, dict) and entry.get("kind") == "hadamard"
        if not known or not isinstance(entry.get("seed"), int) or not isinstance(entry.get("rows"), bool):
            raise VQCError(f"unknown rotation {entry!r} in file")
        return cls(rows, cols, entry["seed"], entry["rows"])

    def extra_repr(self) -> str:
        return f"seed={self.seed}, sides={'rows and inputs' if self.rows is not None else 'inputs'}"
