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
  by many models, never stored in a model's file, never counted in its bits and never trained;
- optional kept rows (``kept_rows``): a few rows also stored apart, in int8 with an fp16 scale
  per row (or exactly, in fp16: ``kept_dtype``), with their row numbers (int32), and decoded as
  stored (a language model's most used token rows, whose error every text meets). In memory
  their codes stay in the stream, unused, so the code layout stays uniform; a file leaves them
  out (``file_streams``) and the bit count does not include them;
- or trellis codes (``trellis``, see ``trellis.py``): d = 1, each code a 16-bit state of a
  bitshift trellis whose 16 × 16 tiles are tail-biting sequences; memory holds the states, a file
  and the bit count only each state's new bits (2 per weight), kept rows' too.

The factor form (quantized sparse decomposition, ``qswd``) generalises the index: a sub-vector is
``Σ_t z_t · C[p_t]`` over ``terms`` (s) distinct codewords. The positions p are stored as
``terms`` indices, or as a k-bit mask per sub-vector where that is smaller; the coefficients z
on a ``coef_bits``-bit grid (odd integers ±1, ±3, … times the row scale), in fp16 (16), or all
1 (0: plain VQ); the codebook C optionally on a ``codebook_bits``-bit grid with one fp16 scale
per codebook. ``terms = 1, coef_bits = 0`` is the plain index: layers, file and report see the
same buffers either way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
from torch import Tensor, nn

from . import lattice, trellis
from .codebook import assign, weighted_assign
from .errors import VQCError

MAX_CODE_BITS = 16  # an index into a codebook: k ≤ 2^16
MAX_PACK_BITS = 32  # any packed entry: a permutation's row numbers need ⌈log2 rows⌉ bits (18 for 262,144 rows)
PACK_SLICE = 1 << 20  # codes packed at a time (a multiple of 8, so each slice fills whole bytes)
SLICE_WEIGHTS = 1 << 22  # weights per slice of rows that a pass over a whole layer holds in float at a time
MAX_GRID_BITS = 8  # coefficient and codebook grids: more bits than this is fp16
FP16_COEFFICIENTS = 16
KEPT_DTYPES = ("int8", "float16")
FLOAT_DTYPES = ("float16", "bfloat16", "float32")  # what codebooks and scales may be stored as
TRAINABLE = ("codebook", "scale", "offset", "gain")  # what fine-tuning may change; codes change by reassignment


def code_bits(k: int) -> int:
    """Bits of one index into a codebook of ``k`` codewords."""
    return max(1, math.ceil(math.log2(k)))


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes LSB-first into a uint8 stream of exactly ceil(n·bits/8) bytes.

    Each code is spread into its ``bits`` low bits and the bit stream is packed by numpy:
    any width from 1 to 32 bits with the same two vector operations (each code seen as 2 bytes
    up to 16 bits, else 4), on slices of ``PACK_SLICE`` codes (whole bytes each), so a table of
    10⁸ codes needs no 16-byte-per-code bit matrix at once.
    """
    if not 1 <= bits <= MAX_PACK_BITS:
        raise ValueError(f"code width {bits} outside 1..{MAX_PACK_BITS}")
    codes = codes.detach().reshape(-1).cpu()
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
        raise ValueError(f"codes do not fit in {bits} bits")
    width = 2 if bits <= MAX_CODE_BITS else 4
    slices = [codes[start:start + PACK_SLICE].numpy().astype(f"<u{width}").view(np.uint8).reshape(-1, width)
              for start in range(0, max(codes.numel(), 1), PACK_SLICE)]
    return torch.from_numpy(np.concatenate([
        np.packbits(np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :bits].reshape(-1), bitorder="little")
        for as_bytes in slices]))


def row_slices(rows: int, cols: int, multiple: int = 1) -> list[slice]:
    """Slices of about ``SLICE_WEIGHTS`` weights covering ``rows`` rows of ``cols`` (each but the
    last a multiple of ``multiple`` rows): a pass over a 262k-row embedding never holds a whole
    float copy of it."""
    step = max(multiple, SLICE_WEIGHTS // cols // multiple * multiple)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def unpack_codes(packed: Tensor, bits: int, index: Tensor) -> Tensor:
    """Read the codes at positions ``index`` straight from the packed stream (no full copy): the
    three bytes that can hold each code (five for an entry wider than 16 bits: a permutation's row
    numbers). A byte past the end is read as the last one instead; its bits land above the code's
    and are masked off. Whole-byte and half-byte codes (k = 256 and k = 16, the common ones) are
    read with one gather: several times fewer passes over the codes."""
    if bits == 8:
        return packed[index].to(torch.int64)
    if bits == 4:
        index = index.to(torch.int64)
        return ((packed[index >> 1].to(torch.int64) >> ((index & 1) << 2)) & 15)
    position = index.to(torch.int64) * bits
    byte, shift = position // 8, position % 8
    last = packed.numel() - 1
    reach, word_type = (3, torch.int32) if bits <= MAX_CODE_BITS else (5, torch.int64)
    word = sum(packed[(byte + i).clamp(max=last)].to(word_type) << (8 * i) for i in range(reach))
    return ((word >> shift) & ((1 << bits) - 1)).to(torch.int64)


def grid_levels(values: Tensor, bits: int) -> Tensor:
    """Nearest level (0 … 2^bits − 1) of the symmetric mid-rise grid ±1, ±3, …, ±(2^bits − 1):
    every level is used, none is zero (a term that is not needed is not stored at all)."""
    top = 2**bits - 1
    return torch.round((values.clamp(-top, top) + top) / 2).to(torch.int64)


def grid_values(levels: Tensor, bits: int) -> Tensor:
    """The grid value of each level: 2·level + 1 − 2^bits."""
    return 2 * levels.float() + 1 - 2**bits


def on_grid(values: Tensor, bits: int) -> Tensor:
    """``values`` projected onto the grid, the gradient passed straight through (for training)."""
    projected = grid_values(grid_levels(values.detach(), bits), bits).to(values)
    return values + (projected - values).detach()


def best_grid_step(values: Tensor, bits: int, dims: tuple[int, ...], shrinks: Tensor,
                   stored: torch.dtype | None = None) -> Tensor:
    """One step per slice of ``values`` (``dims`` reduced, kept as 1) for their ``bits``-bit grid:
    the candidate shrink × absmax / (2^bits − 1) with the least squared error, rounded to the
    ``stored`` dtype where the step is stored."""
    absmax = values.abs().amax(dim=dims, keepdim=True).clamp_min(1e-12) / (2**bits - 1)
    best, best_error = absmax, torch.full_like(absmax, math.inf)
    for shrink in shrinks:
        step = absmax * shrink
        if stored is not None:
            step = step.to(stored).float().clamp_min(torch.finfo(stored).tiny)
        error = (grid_values(grid_levels(values / step, bits), bits) * step - values).square().sum(dim=dims, keepdim=True)
        best = torch.where(error < best_error, step, best)
        best_error = torch.minimum(error, best_error)
    return best


def codebook_grid_scale(codebook: Tensor, bits: int) -> Tensor:
    """One fp16 scale per codebook (groups, 1, 1) for its ``bits``-bit grid: searched between half
    and all of absmax / (2^bits − 1)."""
    return best_grid_step(codebook, bits, (1, 2), torch.linspace(0.5, 1.0, 11), torch.float16)


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
    terms: int = 1  # s: codewords summed per sub-vector (the factor form when > 1)
    coef_bits: int = 0  # 0: unit coefficients; 1–8: mid-rise grid × row scale; 16: fp16
    codebook_bits: int = 0  # 0: codebook stored as ``codebook_dtype``; 1–8: grid with a scale per codebook
    kept_rows: int = 0  # rows also stored apart (with their row numbers), decoded as stored
    kept_dtype: str = "int8"  # kept rows: "int8" (an fp16 absmax scale per row) or "float16" (exact)
    trellis: int = 0  # > 0: codes are bitshift-trellis states (``trellis.py``), this many new bits per weight

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

    @property
    def factored(self) -> bool:
        """Whether a sub-vector is a weighted sum of codewords rather than one codeword."""
        return self.terms > 1 or self.coef_bits > 0

    @property
    def takes_feedback(self) -> bool:
        """Whether codes can be re-chosen with error feedback: plain codes, scales covering whole
        sub-vectors (``CodedWeight.reassign_with_feedback``)."""
        return not self.factored and not (self.scale_group and self.scale_group % self.dim)

    @property
    def file_streams_differ(self) -> bool:
        """Whether a file holds the row streams otherwise than memory: without the kept rows' codes,
        or a trellis's new bits only (``file_streams``)."""
        return bool(self.kept_rows or self.trellis)

    @property
    def masked(self) -> bool:
        """Positions stored as a k-bit mask per sub-vector (cheaper than ``terms`` indices)."""
        return self.terms * self.bits > self.k

    @property
    def position_bits(self) -> int:
        """Bits of the positions of one sub-vector."""
        return self.k if self.masked else self.terms * self.bits

    def nbits(self) -> int:
        """Exact bits of the buffers a weight of this layout stores (``CodedWeight.nbits`` of it),
        known before any fitting: what budgets are checked against."""
        def packed(values: int, width: int) -> int:
            return 8 * ((values * width + 7) // 8)

        if self.codebook_sha256 is not None:
            codebook = 0
        elif self.codebook_bits:
            codebook = packed(self.groups * self.k * self.dim, self.codebook_bits) + 16 * self.groups
        else:
            codebook = self.groups * self.k * self.dim * getattr(torch, self.codebook_dtype).itemsize * 8
        streams = self.stream_bits()
        codes, coefficients = streams["codes"], streams.get("coef", 0)
        scale_bits = getattr(torch, self.scale_dtype).itemsize * 8
        scales = self.rows * (self.cols // self.scale_group) * scale_bits * (1 + self.offset) if self.scale_group else 0
        return (codebook + codes + coefficients + scales + (packed(self.rows, code_bits(self.rows)) if self.permuted else 0)
                + (scale_bits if self.gain else 0) + self.kept_bits())

    def row_streams(self) -> dict[str, tuple[int, int]]:
        """The buffers that hold the same number of entries for every stored row, row after row:
        name → (bits per entry, entries per row). Fp16 coefficients are a (rows, entries) matrix."""
        per_sub_vector = self.terms if self.factored else 1
        streams = {"codes": (1, self.segments * self.k) if self.factored and self.masked
                   else (self.trellis or self.bits, self.segments * per_sub_vector)}
        if self.coef_bits:
            streams["coef"] = (self.coef_bits, self.segments * self.terms)
        return streams

    def stream_bits(self) -> dict[str, int]:
        """Stored bits of each row stream: the rows that are not kept (a kept row's codes are never
        read, so a file leaves them out, but a trellis's tiles need every row); packed streams fill
        whole bytes."""
        coded_rows = self.rows if self.trellis else self.rows - self.kept_rows
        return {name: (16 * coded_rows * per_row if width == FP16_COEFFICIENTS
                       else 8 * ((coded_rows * per_row * width + 7) // 8))
                for name, (width, per_row) in self.row_streams().items()}

    def kept_bits(self) -> int:
        """Bits of the kept rows: their values (int8 and an fp16 scale per row, or fp16) and their
        int32 row numbers (a packed width would save 0.01% of them: not worth a second packing
        scheme for widths past 16 bits)."""
        per_row = self.cols * 8 + 16 if self.kept_dtype == "int8" else self.cols * 16
        return self.kept_rows * (per_row + 32)

    def describe_form(self) -> str:
        """One line for reports: plain index, or the factor form with its settings; and the kept rows."""
        kept = f" +{self.kept_rows} rows {self.kept_dtype.replace('float', 'fp')}" if self.kept_rows else ""
        if self.trellis:
            return f"trellis L={self.bits} +{self.trellis}b" + kept
        if not self.factored and not self.codebook_bits:
            return "index" + kept
        coefficients = {0: "unit", FP16_COEFFICIENTS: "fp16"}.get(self.coef_bits, f"{self.coef_bits}b")
        codebook = f"{self.codebook_bits}b" if self.codebook_bits else self.codebook_dtype.replace("float", "fp")
        return f"Z·C s={self.terms} z={coefficients} C={codebook} {'mask' if self.masked else 'idx'}" + kept

    def validate(self) -> None:
        """Reject layouts that cannot describe this weight, with the reason in words."""
        if len(self.shape) < 2:
            raise VQCError(f"a coded weight needs ≥ 2 dimensions, got shape {self.shape}")
        if not 2 <= self.k <= 1 << MAX_CODE_BITS:
            raise VQCError(f"k = {self.k} is outside 2..{1 << MAX_CODE_BITS}")
        if self.permuted and self.rows > 1 << MAX_PACK_BITS:
            raise VQCError(f"a row permutation of {self.rows} rows needs more than {MAX_PACK_BITS}-bit row numbers")
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
        if not 1 <= self.terms <= self.k:
            raise VQCError(f"s = {self.terms} codewords per sub-vector must be between 1 and k = {self.k}")
        if not (0 <= self.coef_bits <= MAX_GRID_BITS or self.coef_bits == FP16_COEFFICIENTS):
            raise VQCError(f"coefficient bits must be 0 (unit), 1–{MAX_GRID_BITS} or 16 (fp16), got {self.coef_bits}")
        if not 0 <= self.codebook_bits <= MAX_GRID_BITS:
            raise VQCError(f"codebook bits must be 0 (stored as {self.codebook_dtype}) or 1–{MAX_GRID_BITS}, got {self.codebook_bits}")
        if not 0 <= self.kept_rows <= self.rows:
            raise VQCError(f"{self.kept_rows} kept rows: must be between 0 and the {self.rows} rows")
        if self.codebook_dtype not in FLOAT_DTYPES or self.scale_dtype not in FLOAT_DTYPES:
            raise VQCError(f"codebooks and scales are stored as {', '.join(FLOAT_DTYPES)}, not "
                           f"{self.codebook_dtype!r} / {self.scale_dtype!r}")
        if self.kept_dtype not in KEPT_DTYPES:
            raise VQCError(f"kept rows are stored as {' or '.join(KEPT_DTYPES)}, not {self.kept_dtype!r}")
        if self.codebook_bits and (self.codebook_sha256 is not None or self.gain):
            raise VQCError("a codebook on a grid is the layer's own: not a universal or shared one")
        if self.trellis and (self.dim != 1 or self.factored or self.k != 1 << self.bits or self.trellis >= self.bits
                             or self.groups != 1 or self.cols % trellis.TILE or self.permuted
                             or trellis.TILE * self.trellis < self.bits):
            raise VQCError(f"a trellis of {self.bits}-bit states, {self.trellis} new bits per weight, needs d = 1, "
                           f"k = 2^{self.bits}, one codebook, rows in their order, plain codes and inputs in "
                           f"multiples of {trellis.TILE}")

    def buffers(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Each buffer a weight of this layout holds in memory, name → (dtype, shape): what
        ``CodedWeight.empty`` allocates, and what a file's tensors are checked against before that."""
        codes = self.rows * self.segments
        scales, grid = (self.rows, self.cols // (self.scale_group or self.cols)), self.codebook_bits
        sc_dtype = getattr(torch, self.scale_dtype)
        specs = {"codebook": (torch.float32 if grid else getattr(torch, self.codebook_dtype), (self.groups, self.k, self.dim)),
                 "codes": (torch.uint8, ((codes * (self.position_bits if self.factored else self.bits) + 7) // 8,)),
                 "scale": (sc_dtype, scales), "offset": (sc_dtype, scales),
                 "perm": (torch.uint8, ((self.rows * code_bits(self.rows) + 7) // 8,)), "gain": (sc_dtype, (1,)),
                 "coef": ((torch.float16, (self.rows, self.segments * self.terms)) if self.coef_bits == FP16_COEFFICIENTS
                          else (torch.uint8, ((codes * self.terms * self.coef_bits + 7) // 8,))),
                 "codebook_levels": (torch.uint8, ((self.groups * self.k * self.dim * grid + 7) // 8,)),
                 "codebook_scale": (torch.float16, (self.groups, 1, 1)),
                 "kept_index": (torch.int32, (self.kept_rows,)),
                 "kept_values": (getattr(torch, self.kept_dtype), (self.kept_rows, self.cols)),
                 "kept_scale": (torch.float16, (self.kept_rows, 1))}
        present = {"scale": self.scale_group, "offset": self.offset, "perm": self.permuted, "gain": self.gain,
                   "coef": self.coef_bits, "codebook_levels": grid, "codebook_scale": grid, "kept_index": self.kept_rows,
                   "kept_values": self.kept_rows, "kept_scale": self.kept_rows and self.kept_dtype == "int8"}
        return {name: spec for name, spec in specs.items() if present.get(name, True)}

    def file_buffers(self, streams_apart: bool = True) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """``buffers`` as a file stores them: no codebook that is derived (a grid's) or held apart (a
        universal one), and, with ``streams_apart`` (format version 2 on), the row streams as
        ``file_streams`` leaves them."""
        specs = self.buffers()
        if self.codebook_bits or self.codebook_sha256 is not None:
            del specs["codebook"]
        if streams_apart and self.file_streams_differ:
            for name, bits in self.stream_bits().items():
                dtype, shape = specs[name]
                specs[name] = (dtype, (bits // 16 // shape[1], shape[1]) if dtype == torch.float16 else (bits // 8,))
        return specs

    def to_json(self) -> dict:
        """Shape, k, d and every field that differs from its default: what a manifest records."""
        defaults = {item.name: item.default for item in fields(self)}
        return {key: value for key, value in asdict(self).items()
                if key in ("shape", "k", "dim") or value != defaults[key]}

    @classmethod
    def from_json(cls, data: dict) -> CodeLayout:
        return cls(**{**data, "shape": tuple(data["shape"])})


class CodedWeight(nn.Module):
    """A weight held as codebook + packed codes (+ scales, offsets, permutation).

    It is a module so that its tensors are buffers: they follow ``.to(device)`` and survive
    ``state_dict`` round trips with no extra code.
    """

    def __init__(self, layout: CodeLayout, codebook: Tensor, codes: Tensor, scale: Tensor | None = None,
                 offset: Tensor | None = None, perm: Tensor | None = None, gain: Tensor | None = None,
                 coef: Tensor | None = None, codebook_levels: Tensor | None = None, codebook_scale: Tensor | None = None,
                 kept_index: Tensor | None = None, kept_values: Tensor | None = None, kept_scale: Tensor | None = None):
        super().__init__()
        layout.validate()
        self.layout = layout
        self.recipe: dict = {}  # the method and settings that made it, for the file manifest
        self.assigner: nn.Module | None = None  # how assignments learn while it trains (``assign``)
        # a codebook on a grid is stored as its levels and scale; the codewords are derived from them
        self.register_buffer("codebook", codebook, persistent=not layout.codebook_bits)
        self.register_buffer("codes", codes)
        for name, value in (("scale", scale), ("offset", offset), ("perm", perm), ("gain", gain), ("coef", coef),
                            ("codebook_levels", codebook_levels), ("codebook_scale", codebook_scale),
                            ("kept_index", kept_index), ("kept_values", kept_values), ("kept_scale", kept_scale)):
            if value is not None:
                self.register_buffer(name, value)
        if layout.codebook_bits:
            self.register_load_state_dict_post_hook(lambda module, _: module._derive_codebook())

    @classmethod
    def encode(cls, layout: CodeLayout, codebook: Tensor, codes: Tensor, scale: Tensor | None = None,
               offset: Tensor | None = None, perm: Tensor | None = None, gain: Tensor | None = None,
               coefficients: Tensor | None = None) -> CodedWeight:
        """Build from unpacked codes (rows × segments; in the factor form rows × segments × terms
        distinct positions with their ``coefficients``, grid values or fp16 numbers), casting
        tensors to their stored dtypes; a codebook is put on its grid when the layout has one.
        A ``codebook`` already of shape (groups, k, d) in the stored dtype is kept, the very object,
        so several weights can share it."""
        layout.validate()
        cb_dtype, sc_dtype = getattr(torch, layout.codebook_dtype), getattr(torch, layout.scale_dtype)
        stored_shape = (layout.groups, layout.k, layout.dim)
        levels = codebook_scale = coef = None
        if layout.codebook_bits:
            codebook = codebook.reshape(stored_shape).float()
            codebook_scale = codebook_grid_scale(codebook, layout.codebook_bits)
            levels = pack_codes(grid_levels(codebook / codebook_scale, layout.codebook_bits), layout.codebook_bits)
            codebook_scale = codebook_scale.half()
        elif codebook.shape != stored_shape or codebook.dtype != cb_dtype or not codebook.is_contiguous():
            codebook = codebook.reshape(stored_shape).to(cb_dtype).contiguous()
        if layout.factored:
            codes, coef = _pack_terms(layout, codes, coefficients)
        else:
            codes = pack_codes(codes, layout.bits)
        code = cls(
            layout,
            codebook,
            codes,
            None if scale is None else scale.reshape(layout.rows, -1).to(sc_dtype).contiguous(),
            None if offset is None else offset.reshape(layout.rows, -1).to(sc_dtype).contiguous(),
            None if perm is None else pack_codes(perm, code_bits(layout.rows)),
            None if gain is None else gain.reshape(1).to(sc_dtype),
            coef, levels, codebook_scale,
        )
        if layout.codebook_bits:
            code._derive_codebook()
        return code

    @classmethod
    def empty(cls, layout: CodeLayout) -> CodedWeight:
        """A shell with buffers of the right shapes and dtypes, to be filled by ``load_state_dict``."""
        layout.validate()  # before allocating anything from its numbers
        ones = ("gain", "codebook_scale", "kept_scale")
        buffers = {name: (torch.ones if name in ones else torch.zeros)(shape, dtype=dtype)
                   for name, (dtype, shape) in layout.buffers().items()}
        if layout.permuted:
            buffers["perm"] = pack_codes(torch.arange(layout.rows), code_bits(layout.rows))
        return cls(layout, **buffers)

    def _derive_codebook(self) -> None:
        """Codewords (float32) from the stored grid levels and scale (after encoding or loading)."""
        lay = self.layout
        if "codebook" in self._parameters:
            return
        index = torch.arange(lay.groups * lay.k * lay.dim, device=self.codebook_levels.device)
        levels = unpack_codes(self.codebook_levels, lay.codebook_bits, index).reshape(lay.groups, lay.k, lay.dim)
        self._buffers["codebook"] = grid_values(levels, lay.codebook_bits) * self.codebook_scale.float()

    # -- reading ---------------------------------------------------------------------------

    def code_matrix(self, stored_rows: Tensor | None = None) -> Tensor:
        """Codes of the given stored rows (all by default) as a (rows, segments) int64 matrix."""
        lay = self.layout
        rows = torch.arange(lay.rows, device=self.codes.device) if stored_rows is None else stored_rows
        index = rows[:, None] * lay.segments + torch.arange(lay.segments, device=rows.device)
        return unpack_codes(self.codes, lay.bits, index)

    def positions(self, stored_rows: Tensor | None = None) -> Tensor:
        """Codeword positions of the given stored rows as (rows, segments, terms) int64, ascending
        within a sub-vector (the plain index is one term)."""
        lay = self.layout
        if not lay.factored:
            return self.code_matrix(stored_rows)[..., None]
        rows = torch.arange(lay.rows, device=self.codes.device) if stored_rows is None else stored_rows
        if lay.masked:
            mask = unpack_codes(self.codes, 1, self._per_sub_vector(rows, lay.k))
            return torch.nonzero(mask)[:, -1].reshape(len(rows), lay.segments, lay.terms)
        return unpack_codes(self.codes, lay.bits, self._per_sub_vector(rows, lay.terms))

    def _per_sub_vector(self, rows: Tensor, count: int) -> Tensor:
        """Stream positions of ``count`` consecutive entries per sub-vector of the given stored rows,
        as (rows, segments, count): where the factor form's positions and coefficients lie."""
        lay = self.layout
        sub = rows[:, None] * lay.segments + torch.arange(lay.segments, device=rows.device)
        return sub[..., None] * count + torch.arange(count, device=rows.device)

    def coefficients(self, stored_rows: Tensor | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """Coefficients of the given stored rows as (rows, segments, terms), in codeword units
        (the row scale still to apply); ones for plain VQ."""
        lay = self.layout
        rows = torch.arange(lay.rows, device=self.codes.device) if stored_rows is None else stored_rows
        shape = (len(rows), lay.segments, lay.terms)
        if "coef_values" in self._parameters:  # training: the grid projection, straight through
            values = self.coef_values[rows]
            return (values if lay.coef_bits == FP16_COEFFICIENTS else on_grid(values, lay.coef_bits)).to(dtype)
        if lay.coef_bits == 0:
            return torch.ones(shape, dtype=dtype, device=rows.device)
        if lay.coef_bits == FP16_COEFFICIENTS:
            return self.coef[rows].reshape(shape).to(dtype)
        levels = unpack_codes(self.coef, lay.coef_bits, self._per_sub_vector(rows, lay.terms))
        return grid_values(levels, lay.coef_bits).to(dtype)

    def codewords(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The (groups, k, d) codebooks; while a grid codebook trains, its grid projection with the
        gradient passed straight through."""
        lay = self.layout
        if lay.codebook_bits and "codebook" in self._parameters:
            scale = self.codebook_scale.float()
            return (on_grid(self.codebook / scale, lay.codebook_bits) * scale).to(dtype)
        return self.codebook.to(dtype)

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

    def chosen_codewords(self, stored: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """(len(stored), segments, d): the stored codes' values in codeword units (the factor form's
        weighted sums of codewords)."""
        if self.layout.factored:
            picked = self.codewords(dtype)[self.codebook_of_rows(stored)[:, None, None], self.positions(stored)]
            return (picked * self.coefficients(stored, dtype)[..., None]).sum(2)
        return self.codewords(dtype)[self.codebook_of_rows(stored)[:, None], self.code_matrix(stored)]

    def decode_rows(self, rows: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dense (len(rows), cols) slice for original rows: the embedding lookup path."""
        lay = self.layout
        stored = self.stored_rows_of(rows.to(torch.int64))
        values = None if self.assigner is None else self.assigner.codewords(self, rows, stored, dtype)
        values = (self.chosen_codewords(stored, dtype) if values is None else values).reshape(len(stored), lay.cols)
        if lay.scale_group:
            values = values.reshape(len(stored), lay.cols // lay.scale_group, lay.scale_group) * self.scale[stored].to(dtype)[..., None]
            if lay.offset:
                values = values + self.offset[stored].to(dtype)[..., None]
        values = values.reshape(len(stored), lay.cols)
        if lay.gain:
            values = values * self.gain.to(dtype)
        if self.assigner is not None:
            values = self.assigner.adjust(self, rows, values)
        if lay.kept_rows:
            slot, kept = self._kept_slots(rows.to(torch.int64))
            values = torch.where(kept[:, None], self.kept_matrix(dtype, slot), values)
        return values

    def kept_matrix(self, dtype: torch.dtype = torch.float32, slots: Tensor | None = None) -> Tensor:
        """The kept rows' values as stored (all of them, or those in ``slots``), in ``dtype``."""
        values = self.kept_values if slots is None else self.kept_values[slots]
        if self.layout.kept_dtype == "int8":
            return values.to(dtype) * (self.kept_scale if slots is None else self.kept_scale[slots]).to(dtype)
        return values.to(dtype)

    def kept_row_numbers(self) -> Tensor:
        """The original numbers of the kept rows, ascending (int64; the layout must have some)."""
        return self.kept_index.to(torch.int64)

    def _kept_slots(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """For original ``rows``: the slot of each among the kept rows, and whether it is kept."""
        kept = self.kept_row_numbers()
        slot = torch.searchsorted(kept, rows).clamp_max(len(kept) - 1)
        return slot, kept[slot] == rows

    def keep_rows(self, weight: Tensor, rows: Tensor, dtype: str = "int8") -> None:
        """Store original ``rows`` of ``weight`` apart from now on: ``int8`` on a symmetric grid
        with an fp16 scale per row (half the bits of fp16; on Gemma's embedding the rows a text
        meets need about 8 bits, not 16: docs/benchmarks.md), or ``float16``; as many as the
        layout's ``kept_rows``, which this sets, and ``kept_dtype``."""
        rows = torch.unique(rows.to(torch.int64).cpu())
        layout = replace(self.layout, kept_rows=len(rows), kept_dtype=dtype)
        layout.validate()
        self.layout, device = layout, self.codes.device
        for name in ("kept_index", "kept_values", "kept_scale"):
            self._buffers.pop(name, None)
        if not len(rows):
            return
        values = weight.detach().reshape(layout.rows, layout.cols)[rows.to(weight.device)].to(device=device, dtype=torch.float32)
        self.register_buffer("kept_index", rows.to(device=device, dtype=torch.int32))
        if dtype == "int8":
            scale = (values.abs().amax(1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float16).tiny).half()
            values = (values / scale.float()).round().clamp(-127, 127)
            self.register_buffer("kept_scale", scale)
        self.register_buffer("kept_values", values.to(getattr(torch, dtype)).contiguous())

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
        if lay.factored:
            raise VQCError("a factor-form weight keeps the positions and coefficients its method fitted: no reassignment")
        weight, original = weight.detach().reshape(lay.rows, lay.cols), self.permutation()
        if importance is not None:
            importance = importance.expand(lay.rows, lay.cols)  # a view: each slice takes its rows
        self.codes = torch.cat([pack_codes(self._nearest_codes(  # slices of 8 rows' multiples: whole bytes of codes
            weight, original, importance, torch.arange(part.start, part.stop, device=self.codes.device)), lay.bits)
            for part in row_slices(lay.rows, lay.cols, trellis.TILE if lay.trellis else 8)]).to(self.codes.device)

    def _nearest_codes(self, weight: Tensor, original: Tensor, importance: Tensor | None, stored: Tensor) -> Tensor:
        """``reassign``'s codes for a slice of stored rows, (rows, segments) int64."""
        lay = self.layout
        rows = original[stored]
        matrix = self.in_codeword_units(weight[rows.to(weight.device)].to(stored.device).float(), stored)
        if importance is not None:
            importance = importance[rows.to(importance.device)].to(matrix) * self.unit(stored).square()
        codes = torch.empty(len(stored), lay.segments, dtype=torch.int64)
        group = self.codebook_of_rows(stored).cpu()
        structured = lattice.STRUCTURED.get(lay.codebook_sha256)
        for g in group.unique().tolist():
            mine = group == g
            points, book = matrix[mine.to(matrix.device)].reshape(-1, lay.dim), self.codebook.detach()[g].float()
            if lay.trellis:  # tiles, one Viterbi search each (one codebook: ``validate``)
                nearest = trellis.encode_tiles(points.reshape(-1, lay.cols), book, importance, lay.trellis)
            elif structured is not None:  # a lattice: its own exact search, in plain distance
                nearest = structured(points).cpu()
            elif importance is None:
                nearest = torch.from_numpy(assign(points.cpu().numpy(), book.cpu().numpy()))
            else:
                nearest = weighted_assign(points, importance[mine.to(matrix.device)].reshape(-1, lay.dim), book).cpu()
            codes[mine] = nearest.reshape(-1, lay.segments).to(torch.int64)
        return codes

    def reassign_with_feedback(self, weight: Tensor, gram: Tensor) -> None:
        """Assign codes so that the layer's output error tr(ΔGΔᵀ) is small, not each weight's own
        (GPTQ's error feedback, for vectors as in GPTVQ): segments (a trellis: blocks of its
        tiles' width) are taken in column order;
        with G⁻¹ = UᵀU, each row's sub-vector goes to the codeword nearest in the metric
        ‖(w − q) U_bb⁻¹‖², and its error is passed on to the columns not yet assigned
        (w_rest −= (w − q) U_bb⁻¹ U_b,rest), which then absorb it. ``gram`` should be damped."""
        lay = self.layout
        if not lay.takes_feedback:
            raise VQCError("error feedback needs plain codes whose scales cover whole sub-vectors")
        device = self.codes.device
        stored = torch.arange(lay.rows, device=device)
        matrix = weight.detach().reshape(lay.rows, lay.cols)[self.permutation()].float().clone()
        unit = self.unit(stored)
        shift = -unit * self.in_codeword_units(torch.zeros_like(matrix), stored)  # the offsets, in weight units
        factor = _inverse_factor(gram.double().to(device))
        books = self.codebook.detach().float()
        group = self.codebook_of_rows(stored)
        codes = torch.empty(lay.rows, lay.segments, dtype=torch.int64, device=device)
        structured = lattice.STRUCTURED.get(lay.codebook_sha256)
        width = trellis.TILE if lay.trellis else lay.dim  # inputs coded together: a sub-vector, a trellis tile
        for start in range(0, lay.cols, width):
            cols, segments = slice(start, start + width), slice(start // lay.dim, (start + width) // lay.dim)
            inverse = torch.linalg.inv(factor[cols, cols]).float()
            points = (matrix[:, cols] - shift[:, cols]) / unit[:, cols]
            if lay.trellis:  # its tiles in plain distance (QTIP's LDLQ; one codebook: ``validate``)
                codes[:, segments] = trellis.encode_tiles(points.cpu(), books[0, :, 0].cpu(), shift=lay.trellis).to(device)
            elif structured is not None:  # a lattice: its nearest point in plain distance (QuIP#'s LDLQ)
                codes[:, segments] = structured(points)[:, None]
            else:  # each group's rows are a contiguous block: one batched distance for all groups
                codes[:, segments] = torch.cdist((points @ inverse).reshape(lay.groups, -1, lay.dim),
                                                 books @ inverse).argmin(-1).reshape(-1, 1)
            chosen = books[group[:, None], codes[:, segments]].reshape(lay.rows, width) * unit[:, cols] + shift[:, cols]
            matrix[:, cols.stop:] -= ((matrix[:, cols] - chosen) @ inverse) @ factor[cols, cols.stop:].float()
        self.codes = pack_codes(codes.reshape(-1), lay.bits).to(device)

    def unit(self, stored: Tensor) -> Tensor:
        """Size of one codeword unit at each weight of the given stored rows (gain × scale): an
        error of e in codeword units is an error of e × unit in the weight."""
        lay = self.layout
        unit = torch.ones(len(stored), lay.cols, device=self.codes.device)
        if lay.scale_group:
            scale = self.scale.detach()[stored].float()[..., None]
            unit = (unit.reshape(len(stored), -1, lay.scale_group) * scale).reshape(len(stored), lay.cols)
        return unit * self.gain.detach().float() if lay.gain else unit

    def in_codeword_units(self, matrix: Tensor, stored: Tensor) -> Tensor:
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

    def start_training(self, shared: dict[int, tuple] | None = None) -> None:
        """Turn codebooks, scales, offsets and gains into float32 parameters that gradients reach
        through ``decode`` (a codeword gets the summed gradient of its sub-vectors); assignments
        learn by a strategy attached beside (``assign``). Give every weight of a model the same
        ``shared`` dict, so that a codebook several weights hold becomes one parameter."""
        shared = {} if shared is None else shared
        for name in TRAINABLE:
            if name in self._buffers and not self._held_apart(name):
                buffer = self._buffers.pop(name)
                if id(buffer) not in shared:  # the pair keeps the key alive, so its id cannot be reused
                    shared[id(buffer)] = (buffer, nn.Parameter(buffer.float()))
                self.register_parameter(name, shared[id(buffer)][1])
        if self.layout.coef_bits:  # coefficients train in codeword units, their positions fixed
            self.coef_values = nn.Parameter(self.coefficients().clone())

    def finish_training(self, shared: dict[int, tuple] | None = None) -> None:
        """Store everything in its stored dtype (a parameter several weights hold stays one tensor,
        given the same ``shared``)."""
        shared = {} if shared is None else shared
        lay = self.layout
        if "coef_values" in self._parameters:
            self.coef = _pack_coefficients(lay, self._parameters.pop("coef_values").detach())
        if lay.codebook_bits and "codebook" in self._parameters:  # back onto its grid, same scale
            levels = grid_levels(self._parameters.pop("codebook").detach() / self.codebook_scale.float(), lay.codebook_bits)
            self.codebook_levels = pack_codes(levels, lay.codebook_bits).to(self.codebook_levels.device)
            self.register_buffer("codebook", torch.empty(0), persistent=False)
            self._derive_codebook()
        for name in TRAINABLE:
            if name in self._parameters:
                parameter = self._parameters.pop(name)
                dtype = getattr(torch, lay.codebook_dtype if name == "codebook" else lay.scale_dtype)
                if id(parameter) not in shared:
                    shared[id(parameter)] = (parameter, parameter.detach().to(dtype))
                self.register_buffer(name, shared[id(parameter)][1])

    def nbits(self) -> int:
        """Exact storage cost: every byte of every buffer this weight stores (a universal codebook
        is stored apart, once for every model), its row streams as a file holds them
        (``file_streams``)."""
        sizes = {name: b.numel() * b.element_size() * 8 for name, b in self.named_buffers(recurse=False)
                 if not self._held_apart(name) and name not in self._non_persistent_buffers_set}
        if self.layout.file_streams_differ:
            sizes.update(self.layout.stream_bits())
        return sum(sizes.values())

    def _held_apart(self, name: str) -> bool:
        """Whether buffer ``name`` is a universal codebook: stored in a file of its own, frozen."""
        return name == "codebook" and self.layout.codebook_sha256 is not None

    def extra_repr(self) -> str:
        lay = self.layout
        return f"shape={lay.shape}, k={lay.k}, d={lay.dim}, groups={lay.groups}, bits/weight={self.nbits() / math.prod(lay.shape):.3f}"


def _inverse_factor(gram: Tensor) -> Tensor:
    """U with G⁻¹ = UᵀU (upper triangular), for a Gram matrix that calibration may leave singular
    (inputs that never vary, a layer seen on few positions): the ridge grows tenfold from 10⁻⁸ of
    the mean diagonal until the factorisation succeeds, as GPTQ does."""
    scale = gram.diagonal().mean().clamp_min(1e-30)
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    for jitter in [0.0, *(10.0**e for e in range(-8, 1))]:
        lower, info = torch.linalg.cholesky_ex(gram + jitter * scale * eye)
        if not info:
            inverse, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if not info:
                return inverse
    return eye  # nothing to learn from these inputs: every weight counts alike


def _pack_coefficients(layout: CodeLayout, coefficients: Tensor) -> Tensor:
    """Coefficients (rows × segments × terms, codeword units) as stored: grid levels bit-packed,
    or fp16 numbers (rows × segments·terms)."""
    if layout.coef_bits == FP16_COEFFICIENTS:
        return coefficients.reshape(layout.rows, -1).to(torch.float16).contiguous()
    return pack_codes(grid_levels(coefficients, layout.coef_bits), layout.coef_bits).to(coefficients.device)


def _pack_terms(layout: CodeLayout, positions: Tensor, coefficients: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The factor form's positions (rows × segments × terms, distinct within a sub-vector) as
    indices or a k-bit mask, whichever the layout stores, with their coefficients in the same
    ascending order of position."""
    positions = positions.reshape(layout.rows, layout.segments, layout.terms).to(torch.int64)
    positions, order = positions.sort(-1)
    if (positions[..., 1:] == positions[..., :-1]).any():
        raise ValueError("a sub-vector's positions must be distinct")
    if layout.masked:
        mask = torch.zeros(layout.rows, layout.segments, layout.k, dtype=torch.int64, device=positions.device)
        codes = pack_codes(mask.scatter_(-1, positions, 1), 1)
    else:
        codes = pack_codes(positions, layout.bits)
    if not layout.coef_bits:
        return codes, None
    return codes, _pack_coefficients(layout, coefficients.reshape(positions.shape).float().gather(-1, order))


def _coded_rows(layout: CodeLayout, buffers: dict[str, Tensor]) -> Tensor:
    """Stored rows that are not kept rows (ascending), from a weight's ``kept_index`` and ``perm``;
    every row for a trellis, whose tiles span kept rows too."""
    if not layout.kept_rows or layout.trellis:
        return torch.arange(layout.rows)
    kept = buffers["kept_index"].cpu().to(torch.int64)
    if layout.permuted:
        rows = torch.arange(layout.rows)
        kept = torch.argsort(unpack_codes(buffers["perm"].cpu(), code_bits(layout.rows), rows))[kept]
    coded = torch.ones(layout.rows, dtype=torch.bool)
    coded[kept] = False
    return coded.nonzero()[:, 0]


def _memory_width(layout: CodeLayout, stream: str, width: int) -> int:
    """Bits of one entry of a row stream in memory: a trellis's codes are whole states there."""
    return layout.bits if layout.trellis and stream == "codes" else width


def file_streams(layout: CodeLayout, buffers: dict[str, Tensor]) -> dict[str, Tensor]:
    """A weight's row streams (``CodeLayout.row_streams``) as a file stores them: the kept rows'
    entries left out, as nothing reads them, and a trellis's states as their new bits.
    ``buffers``: the weight's buffers by name."""
    rows = _coded_rows(layout, buffers)
    stored = {}
    for name, (width, per_row) in layout.row_streams().items():
        stream = buffers[name].cpu()
        if stream.dtype != torch.uint8:  # fp16 coefficients: a matrix of rows
            stored[name] = stream[rows].contiguous()
            continue
        index = (rows[:, None] * per_row + torch.arange(per_row)).reshape(-1)
        entries = unpack_codes(stream, _memory_width(layout, name, width), index)
        stored[name] = pack_codes(trellis.new_bits(entries, width) if width != _memory_width(layout, name, width)
                                  else entries, width)
    return stored


def memory_streams(layout: CodeLayout, buffers: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of ``file_streams``: the row streams as memory holds them, every kept row given
    valid placeholder entries (positions 0 … s − 1, grid level 0), never read."""
    rows = _coded_rows(layout, buffers)
    full = {}
    for name, (width, per_row) in layout.row_streams().items():
        stream = buffers[name]
        if stream.dtype != torch.uint8:
            full[name] = stream.new_zeros(layout.rows, stream.shape[1]).index_copy_(0, rows, stream)
            continue
        matrix = _placeholder_row(layout, name).repeat(layout.rows, 1)
        entries = unpack_codes(stream, width, torch.arange(len(rows) * per_row)).reshape(len(rows), per_row)
        memory = _memory_width(layout, name, width)
        matrix[rows] = trellis.states_of_tiles(entries, memory, width) if memory != width else entries
        full[name] = pack_codes(matrix, memory)
    return full


def _placeholder_row(layout: CodeLayout, stream: str) -> Tensor:
    """Entries of one row of ``stream`` that decode without error: distinct positions, level 0."""
    if stream == "coef":
        return torch.zeros(1, layout.segments * layout.terms, dtype=torch.int64)
    if layout.factored and layout.masked:
        mask = torch.zeros(layout.k, dtype=torch.int64)
        mask[:layout.terms] = 1
        return mask.repeat(layout.segments)[None]
    return torch.arange(layout.terms if layout.factored else 1).repeat(layout.segments)[None]
