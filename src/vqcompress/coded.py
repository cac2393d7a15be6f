"""The one representation of a compressed weight, shared by every method, layer, file and report.

A weight is seen as a matrix of ``rows`` output rows and ``cols`` inputs (a conv kernel is
``out × (in/groups · kh · kw)``, an embedding ``num × dim``). Each row is cut into sub-vectors of
length ``dim`` along the inputs, so that the lookup-table product works; every sub-vector is
stored as the index of a codeword, bit-packed at ``ceil(log2 k)`` bits. On top of that:

- ``groups`` codebooks, each serving a contiguous block of rows (1 = one codebook per layer);
- optional scales (and offsets), one per row and block of ``scale_group`` inputs:
  ``w = codeword · scale + offset``; per-row scale is ``scale_group == cols``;
- an optional row permutation: stored row ``r`` is original row ``perm[r]``, bit-packed at
  ``ceil(log2 rows)`` bits per row;
- an optional per-layer ``gain`` (one fp16 number multiplying the whole weight), so that layers
  of different magnitude can share one codebook: the same codebook tensor held by several coded
  weights is stored once in the file and trained as one parameter;
- or a universal codebook (``codebook_sha256``, see ``universal.py``): a file of its own, shared
  by many models, never stored in a model's file, never counted in its bits and never trained.

A later factor form (Z · C) can be added as another ``decode`` source without touching the
layers, the file or the report, since they only use ``decode``, ``codes`` and the buffers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .codebook import assign, weighted_assign
from .errors import VQCError

MAX_CODE_BITS = 16
TRAINABLE = ("codebook", "scale", "offset", "gain")  # what fine-tuning may change; codes change by reassignment


def code_bits(k: int) -> int:
    """Bits of one index into a codebook of ``k`` codewords."""
    return max(1, math.ceil(math.log2(k)))


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes LSB-first into a uint8 stream of exactly ceil(n·bits/8) bytes.

    Each code is spread into its ``bits`` low bits and the bit stream is packed by numpy:
    any width from 1 to 16 bits with the same two vector operations.
    """
    if not 1 <= bits <= MAX_CODE_BITS:
        raise ValueError(f"code width {bits} outside 1..{MAX_CODE_BITS}")
    codes = codes.detach().reshape(-1).cpu().to(torch.int64)
    if codes.numel() and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise ValueError(f"codes do not fit in {bits} bits")
    as_bytes = codes.numpy().astype("<u2").view(np.uint8).reshape(-1, 2)
    bit_matrix = np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :bits]
    return torch.from_numpy(np.packbits(bit_matrix.reshape(-1), bitorder="little"))


def unpack_codes(packed: Tensor, bits: int, index: Tensor) -> Tensor:
    """Read the codes at positions ``index`` straight from the packed stream (no full copy): the
    three bytes that can hold each code. A byte past the end is read as the last one instead; its
    bits land above the code's and are masked off."""
    position = index.to(torch.int64) * bits
    byte, shift = position // 8, position % 8
    last = packed.numel() - 1
    word = sum(packed[(byte + i).clamp(max=last)].to(torch.int32) << (8 * i) for i in range(3))
    return ((word >> shift) & ((1 << bits) - 1)).to(torch.int64)


@dataclass(frozen=True)
class CodeLayout:
    """Everything about a coded weight that is not a tensor: what the file manifest records."""

    shape: tuple[int, ...]
    k: int
    dim: int
    groups: int = 1
    scale_group: int | None = None
    offset: bool = False
    permuted: bool = False
    gain: bool = False
    codebook_dtype: str = "float16"
    scale_dtype: str = "float16"
    codebook_sha256: str | None = None  # the codebook is this universal one, held outside the model

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def bits(self) -> int:
        return code_bits(self.k)

    @property
    def segments(self) -> int:
        """Sub-vectors per row."""
        return self.cols // self.dim

    def validate(self) -> None:
        """Reject layouts that cannot describe this weight, with the reason in words."""
        if len(self.shape) < 2:
            raise VQCError(f"a coded weight needs ≥ 2 dimensions, got shape {self.shape}")
        if not 2 <= self.k <= 1 << MAX_CODE_BITS:
            raise VQCError(f"k = {self.k} is outside 2..{1 << MAX_CODE_BITS}")
        if self.dim < 1 or self.groups < 1 or (self.scale_group is not None and self.scale_group < 1):
            raise VQCError(f"d, groups and scale group must be positive, got {self.dim}, {self.groups}, {self.scale_group}")
        if self.offset and self.scale_group is None:
            raise VQCError("offsets need a scale group")
        if self.cols % self.dim:
            raise VQCError(f"sub-vector length d = {self.dim} does not divide the {self.cols} inputs of shape {self.shape}")
        if self.codebook_sha256 is not None and self.groups != 1:
            raise VQCError("a universal codebook serves a layer as its one codebook (groups = 1)")
        if self.rows % self.groups:
            raise VQCError(f"{self.groups} codebook groups do not divide the {self.rows} rows")
        if self.scale_group is not None and (self.cols % self.scale_group or self.scale_group % self.dim):
            raise VQCError(f"scale group {self.scale_group} must divide {self.cols} inputs and be a multiple of d = {self.dim}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> CodeLayout:
        return cls(**{**data, "shape": tuple(data["shape"])})


class CodedWeight(nn.Module):
    """A weight held as codebook + packed codes (+ scales, offsets, permutation).

    It is a module so that its tensors are buffers: they follow ``.to(device)`` and survive
    ``state_dict`` round trips with no extra code.
    """

    def __init__(self, layout: CodeLayout, codebook: Tensor, codes: Tensor, scale: Tensor | None = None,
                 offset: Tensor | None = None, perm: Tensor | None = None, gain: Tensor | None = None):
        super().__init__()
        layout.validate()
        self.layout = layout
        self.recipe: dict = {}  # the method and settings that made it, for the file manifest
        self.temperature: float | None = None  # set while assignments train soft (see ``finetune``)
        self.assigner: nn.Module | None = None  # set while candidate assignments train (``progressive``)
        self.register_buffer("codebook", codebook)
        self.register_buffer("codes", codes)
        for name, value in (("scale", scale), ("offset", offset), ("perm", perm), ("gain", gain)):
            if value is not None:
                self.register_buffer(name, value)

    @classmethod
    def encode(cls, layout: CodeLayout, codebook: Tensor, codes: Tensor, scale: Tensor | None = None,
               offset: Tensor | None = None, perm: Tensor | None = None, gain: Tensor | None = None) -> CodedWeight:
        """Build from unpacked codes (rows × segments), casting tensors to their stored dtypes.
        A ``codebook`` already of shape (groups, k, d) in the stored dtype is kept, the very object,
        so several weights can share it."""
        layout.validate()
        cb_dtype, sc_dtype = getattr(torch, layout.codebook_dtype), getattr(torch, layout.scale_dtype)
        stored_shape = (layout.groups, layout.k, layout.dim)
        if codebook.shape != stored_shape or codebook.dtype != cb_dtype or not codebook.is_contiguous():
            codebook = codebook.reshape(stored_shape).to(cb_dtype).contiguous()
        return cls(
            layout,
            codebook,
            pack_codes(codes, layout.bits),
            None if scale is None else scale.reshape(layout.rows, -1).to(sc_dtype).contiguous(),
            None if offset is None else offset.reshape(layout.rows, -1).to(sc_dtype).contiguous(),
            None if perm is None else pack_codes(perm, code_bits(layout.rows)),
            None if gain is None else gain.reshape(1).to(sc_dtype),
        )

    @classmethod
    def empty(cls, layout: CodeLayout) -> CodedWeight:
        """A shell with buffers of the right shapes and dtypes, to be filled by ``load_state_dict``."""
        layout.validate()  # before allocating anything from its numbers
        n_codes = layout.rows * layout.segments
        n_scales = layout.cols // layout.scale_group if layout.scale_group else 0
        sc_dtype = getattr(torch, layout.scale_dtype)
        return cls(
            layout,
            torch.zeros(layout.groups, layout.k, layout.dim, dtype=getattr(torch, layout.codebook_dtype)),
            torch.zeros((n_codes * layout.bits + 7) // 8, dtype=torch.uint8),
            torch.zeros(layout.rows, n_scales, dtype=sc_dtype) if layout.scale_group else None,
            torch.zeros(layout.rows, n_scales, dtype=sc_dtype) if layout.offset else None,
            pack_codes(torch.arange(layout.rows), code_bits(layout.rows)) if layout.permuted else None,
            torch.ones(1, dtype=sc_dtype) if layout.gain else None,
        )

    # -- reading ---------------------------------------------------------------------------

    def code_matrix(self, stored_rows: Tensor | None = None) -> Tensor:
        """Codes of the given stored rows (all by default) as a (rows, segments) int64 matrix."""
        lay = self.layout
        rows = torch.arange(lay.rows, device=self.codes.device) if stored_rows is None else stored_rows
        index = rows[:, None] * lay.segments + torch.arange(lay.segments, device=rows.device)
        return unpack_codes(self.codes, lay.bits, index)

    def codebook_of_rows(self, stored_rows: Tensor) -> Tensor:
        """Which codebook group each stored row uses."""
        return stored_rows // (self.layout.rows // self.layout.groups)

    def permutation(self) -> Tensor:
        """The original row number of every stored row (int64; the identity when not permuted)."""
        rows = torch.arange(self.layout.rows, device=self.codes.device)
        return unpack_codes(self.perm, code_bits(self.layout.rows), rows) if self.layout.permuted else rows

    def stored_rows_of(self, rows: Tensor) -> Tensor:
        """Map original row numbers to stored row numbers (undo the permutation)."""
        if not self.layout.permuted:
            return rows
        return torch.argsort(self.permutation())[rows]

    def decode_rows(self, rows: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dense (len(rows), cols) slice for original rows: the embedding lookup path."""
        lay = self.layout
        stored = self.stored_rows_of(rows.to(torch.int64))
        soft = self.temperature is not None and "latent" in self._parameters
        if self.assigner is not None:
            values = self.assigner(stored, self.codebook.to(dtype), self.codebook_of_rows(stored))
        elif soft:
            values = self._soft_codewords(rows, stored, dtype)
        else:
            values = self.codebook.to(dtype)[self.codebook_of_rows(stored)[:, None], self.code_matrix(stored)]
        values = values.reshape(len(stored), lay.cols)
        if lay.scale_group:
            values = values.reshape(len(stored), lay.cols // lay.scale_group, lay.scale_group) * self.scale[stored].to(dtype)[..., None]
            if lay.offset:
                values = values + self.offset[stored].to(dtype)[..., None]
        values = values.reshape(len(stored), lay.cols)
        if lay.gain:
            values = values * self.gain.to(dtype)
        if "latent" in self._parameters and not soft:  # straight-through: quantized value, gradient to the latent
            latent = self.latent.reshape(lay.rows, lay.cols)[rows].to(dtype)
            values = values + latent - latent.detach()
        return values

    def decode(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense weight in its original shape."""
        rows = torch.arange(self.layout.rows, device=self.codes.device)
        return self.decode_rows(rows, dtype).reshape(self.layout.shape)

    # -- assignment and training ---------------------------------------------------------------

    def reassign(self, weight: Tensor, importance: Tensor | None = None) -> None:
        """Point every sub-vector at the codeword nearest to ``weight`` (original row order), under
        the current codebooks, scales and offsets: the one assignment rule every method shares.
        With ``importance`` (broadcastable to the weight matrix, original row order) the distance
        weighs each weight's error by it: an activation-aware assignment."""
        lay = self.layout
        stored = torch.arange(lay.rows, device=self.codes.device)
        original = self.permutation()
        matrix = self._in_codeword_units(weight.detach().reshape(lay.rows, lay.cols)[original].float(), stored)
        if importance is None:
            points = matrix.reshape(lay.groups, -1, lay.dim).cpu().numpy()
            codebooks = self.codebook.detach().float().cpu().numpy()
            codes = torch.cat([torch.from_numpy(assign(p, c)) for p, c in zip(points, codebooks)])
        else:
            weights = importance.to(matrix).expand(lay.rows, lay.cols)[original] * self.unit(stored).square()
            codes = torch.cat([weighted_assign(p, w, c.float()) for p, w, c in zip(
                matrix.reshape(lay.groups, -1, lay.dim), weights.reshape(lay.groups, -1, lay.dim), self.codebook.detach())])
        self.codes = pack_codes(codes, lay.bits).to(self.codes.device)

    def unit(self, stored: Tensor) -> Tensor:
        """Size of one codeword unit at each weight of the given stored rows (gain × scale): an
        error of e in codeword units is an error of e × unit in the weight."""
        lay = self.layout
        unit = torch.ones(len(stored), lay.cols, device=self.codes.device)
        if lay.scale_group:
            scale = self.scale.detach()[stored].float()[..., None]
            unit = (unit.reshape(len(stored), -1, lay.scale_group) * scale).reshape(len(stored), lay.cols)
        return unit * self.gain.detach().float() if lay.gain else unit

    def _in_codeword_units(self, matrix: Tensor, stored: Tensor) -> Tensor:
        """Dense rows (of the given stored rows) with gain, offsets and scales undone: the units
        the codewords are in. Those factors are taken as constants, not differentiated."""
        lay = self.layout
        if lay.gain:
            matrix = matrix / self.gain.detach().to(matrix)
        if lay.scale_group:
            matrix = matrix.reshape(len(stored), -1, lay.scale_group)
            if lay.offset:
                matrix = matrix - self.offset.detach()[stored].to(matrix)[..., None]
            matrix = matrix / self.scale.detach()[stored].to(matrix)[..., None]
        return matrix.reshape(len(stored), lay.cols)

    def _soft_codewords(self, rows: Tensor, stored: Tensor, dtype: torch.dtype) -> Tensor:
        """Soft assignment (differentiable k-means): each sub-vector of the latent weight becomes the
        softmax mixture of its codebook's codewords, weighted by -distance² / temperature. The
        temperature is relative to the mean squared distance to the nearest codeword, so one
        schedule suits every layer; as it falls to 0 the mixture becomes the nearest codeword."""
        lay = self.layout
        latent = self.latent.reshape(lay.rows, lay.cols)[rows].to(dtype)
        points = self._in_codeword_units(latent, stored).reshape(len(stored), lay.segments, lay.dim)
        codebooks = self.codebook.to(dtype)[self.codebook_of_rows(stored)]  # (rows, k, d)
        # |p - c|² less |p|², which is the same for every codeword of a segment: softmax ignores it
        partial = torch.baddbmm(codebooks.square().sum(-1)[:, None, :], points, codebooks.transpose(1, 2), alpha=-2)
        with torch.no_grad():
            unit = (points.square().sum(-1) + partial.min(-1).values).mean().clamp_min(torch.finfo(dtype).tiny)
        weights = torch.softmax(partial / (-self.temperature * unit), dim=-1)
        return weights @ codebooks

    def start_training(self, latent: Tensor | None = None, shared: dict[int, tuple] | None = None) -> None:
        """Turn codebooks, scales, offsets and gains into float32 parameters that gradients reach
        through ``decode`` (a codeword gets the summed gradient of its sub-vectors). To learn
        assignments, pass a ``latent`` dense weight (best the original one, which still knows where
        each sub-vector lies inside its cell): the forward pass uses its quantized value and passes
        the gradient straight through to it. Give every weight of a model the same ``shared`` dict,
        so that a codebook several weights hold becomes one parameter."""
        shared = {} if shared is None else shared
        for name in TRAINABLE:
            if name in self._buffers and not self._held_apart(name):
                buffer = self._buffers.pop(name)
                if id(buffer) not in shared:  # the pair keeps the key alive, so its id cannot be reused
                    shared[id(buffer)] = (buffer, nn.Parameter(buffer.float()))
                self.register_parameter(name, shared[id(buffer)][1])
        if latent is not None:
            self.latent = nn.Parameter(latent.detach().float().reshape(self.layout.shape).clone())

    def finish_training(self, shared: dict[int, tuple] | None = None) -> None:
        """Keep the current assignment, drop the latent weight, store everything in its stored
        dtype (a parameter several weights hold stays one tensor, given the same ``shared``)."""
        shared = {} if shared is None else shared
        self._parameters.pop("latent", None)
        for name in TRAINABLE:
            if name in self._parameters:
                parameter = self._parameters.pop(name)
                dtype = getattr(torch, self.layout.codebook_dtype if name == "codebook" else self.layout.scale_dtype)
                if id(parameter) not in shared:
                    shared[id(parameter)] = (parameter, parameter.detach().to(dtype))
                self.register_buffer(name, shared[id(parameter)][1])

    def nbits(self) -> int:
        """Exact storage cost: every byte of every buffer this weight stores (a universal codebook
        is stored apart, once for every model)."""
        return sum(b.numel() * b.element_size() * 8 for name, b in self.named_buffers(recurse=False)
                   if not self._held_apart(name))

    def _held_apart(self, name: str) -> bool:
        """Whether buffer ``name`` is a universal codebook: stored in a file of its own, frozen."""
        return name == "codebook" and self.layout.codebook_sha256 is not None

    def extra_repr(self) -> str:
        lay = self.layout
        return f"shape={lay.shape}, k={lay.k}, d={lay.dim}, groups={lay.groups}, bits/weight={self.nbits() / math.prod(lay.shape):.3f}"
