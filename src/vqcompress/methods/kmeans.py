"""``kmeans``: per-layer vector quantization with k-means codebooks.

Sub-vectors of length d along the inputs; one codebook per layer or one per block of output
rows (``groups``); by default each row is first divided by its RMS (``scale="row"``, stored in
fp16; ``"none"`` to leave it out) so that rows of different magnitude share the codebook well —
convolutions with BatchNorm folded in have rows 10⁵ apart, which one unscaled codebook rounds to
zero — while without calibration k-means still weighs each sub-vector by its row's RMS², so the
codebook minimises the error in the weight's own units (docs/methods.md, "Real pretrained networks").

A bit budget is a ceiling on the index bits per weight: it picks the (d, k = 2^width) with
width/d closest to it from below (the longest such d), with k ≤ 256 (a codebook that stays in
cache and costs little to store), d dividing the layer's inputs, at least one sub-vector per
codeword, and codebooks costing at most a quarter of the index bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from ..calibrate import InputStatistics
from ..codebook import PointSource, in_memory, kmeans
from ..coded import CodedWeight, CodeLayout, row_slices
from ..errors import Unfit, VQCError
from . import MethodConfig, register

MAX_BUDGET_K = 256
MAX_DIM = 16
MAX_CODEBOOK_SHARE = 0.25  # of the index bits: beyond that a shorter d buys more than it loses


def dim_and_k_for_bits(bits: float, shape: tuple[int, ...], groups: int = 1,
                       codebook_share: float = MAX_CODEBOOK_SHARE) -> tuple[int, int]:
    """The (d, k = 2^width) whose index bits width/d come closest to ``bits`` without passing it.

    The budget is a ceiling, so a layer whose inputs no exact d divides (a 3×3 conv on one
    channel has 9) still gets the best layout under it. Candidates: d ≤ 16 dividing the inputs,
    k ≤ 256, no more codewords than each codebook has sub-vectors, and fp16 codebooks costing at
    most ``codebook_share`` of the index bits (small layers get shorter d; a codebook shared by
    many layers is not charged to one); ties go to the longer d. Only where no d has room for its
    full width (a 3×3 depthwise kernel of 16 channels: 144 weights) does a narrower one count.
    """
    rows, cols = shape[0], math.prod(shape[1:])
    candidates = []
    for dim in range(1, MAX_DIM + 1):
        full = min(math.floor(bits * dim + 1e-9), int(math.log2(MAX_BUDGET_K)))
        for width in range(full, 0, -1):
            if (cols % dim == 0 and 2**width <= rows * cols // dim // groups
                    and 16 * 2**width * dim * groups <= codebook_share * bits * rows * cols):
                candidates.append((width == full, width / dim, dim, width))
                break
    if not candidates:
        raise Unfit(
            f"no codebook with d ≤ {MAX_DIM} dividing {cols} inputs and k ≤ {MAX_BUDGET_K} fits {bits} bits per "
            f"weight on shape {tuple(shape)}: choose another --bits or set --dim and --k"
        )
    _, _, dim, width = max(candidates)
    return dim, 2**width


@dataclass(frozen=True)
class KMeansConfig(MethodConfig):
    """``dim`` and ``k`` (default: from the budget), ``scale`` ("row": each row over its RMS
    first), ``groups`` (codebooks per layer, blocks of rows), k-means ``iterations`` and
    ``max_points_per_centroid``, ``shared`` (N codebooks for the whole model, shared by runs of
    layers with a per-layer gain)."""

    method: ClassVar[str] = "kmeans"
    minimum: ClassVar[dict[str, float]] = {"dim": 1, "k": 2, "groups": 1, "iterations": 1,
                                           "max_points_per_centroid": 1, "shared": 0}
    dim: int | None = None
    k: int | None = None
    scale: Literal["none", "row"] | None = None
    groups: int | None = None
    iterations: int | None = None
    max_points_per_centroid: int | None = None
    shared: int | None = None


class KMeans:
    name = "kmeans"
    config = KMeansConfig
    learns_assignments = False
    needs_training = False

    def settings(self, shape: tuple[int, ...], bits: float | None, config: KMeansConfig) -> dict:
        dim, k, groups, shared = config.dim, config.k, config.groups or 1, config.shared or 0
        if shared and groups != 1:
            raise VQCError(f"shared codebooks go with one codebook per layer, got groups = {groups}")
        if dim is None or k is None:
            dim, k = self._complete_from_budget(bits, shape, groups, dim, k, math.inf if shared else MAX_CODEBOOK_SHARE)
        return {
            "dim": int(dim), "k": int(k), "scale": config.scale or "row", "groups": groups,  # default: see the module's docstring
            "iterations": config.iterations or 20, "max_points_per_centroid": config.max_points_per_centroid or 256,
            "shared": shared,
        }

    @staticmethod
    def _complete_from_budget(bits: float | None, shape: tuple[int, ...], groups: int, dim: int | None,
                              k: int | None, codebook_share: float) -> tuple[int, int]:
        """Fill whichever of d and k was not given so that log2(k) / d equals the budget."""
        if bits is None:
            raise VQCError("kmeans needs --bits, or both --dim and --k")
        if bits <= 0:
            raise VQCError(f"a bit budget must be positive, got {bits}")
        if dim is None and k is None:
            return dim_and_k_for_bits(bits, shape, groups, codebook_share)
        if dim is None:
            dim = math.log2(int(k)) / bits
            if abs(dim - round(dim)) > 1e-9 or round(dim) < 1:
                raise VQCError(f"k = {k} cannot give {bits} bits per weight with a whole sub-vector length")
            return round(dim), int(k)
        width = bits * int(dim)
        if abs(width - round(width)) > 1e-9 or not 1 <= round(width) <= 16:
            raise VQCError(f"d = {dim} cannot give {bits} bits per weight with a codebook of at most 2^16 codewords")
        return int(dim), 2 ** round(width)

    def layout(self, shape: tuple[int, ...], settings: dict) -> CodeLayout:
        cols = math.prod(shape[1:])
        layout = CodeLayout(tuple(shape), k=settings["k"], dim=settings["dim"], groups=settings["groups"],
                            scale_group=cols if settings["scale"] == "row" else None, gain=bool(settings["shared"]))
        layout.validate()
        points = layout.rows * layout.segments // layout.groups
        if points < layout.k and not settings["shared"]:  # a shared codebook is fitted on every layer's points
            raise VQCError(f"k = {layout.k} codewords exceed the {points} sub-vectors of each codebook of shape "
                           f"{layout.shape}: lower k or d")
        return layout

    def fit(self, weight: Tensor, settings: dict, seed: int, inputs: InputStatistics | None = None) -> CodedWeight:
        layout = self.layout(tuple(weight.shape), settings)
        matrix = weight.reshape(layout.rows, layout.cols).float().cpu()
        scale = _rms(matrix, rows=True) if settings["scale"] == "row" else None
        importance = None if inputs is None else inputs.importance().cpu()
        weighting = torch.ones(1, 1) if importance is None and scale is not None else importance  # error in the weight's units
        codebook = _codebooks(matrix, 1 if scale is None else scale, weighting, layout.groups, settings, seed)
        return _encode(layout, codebook, matrix, scale, importance=importance)

    def fit_shared(self, weights: list[Tensor], settings: dict, seed: int,
                   inputs: list[InputStatistics | None] | None = None) -> list[CodedWeight]:
        """One codebook for several layers (VQ-DNN's global codebook): each layer is divided by
        its RMS (its gain, stored in fp16) and, with ``scale="row"``, each row by its own; the
        codebook is fitted on the sub-vectors of all of them and held by each, one tensor."""
        layouts = [self.layout(tuple(w.shape), settings) for w in weights]
        matrices = [w.reshape(lay.rows, lay.cols).float().cpu() for w, lay in zip(weights, layouts)]
        gains = [_rms(matrix) for matrix in matrices]
        scales = [_rms(m / g, rows=True) if settings["scale"] == "row" else None for m, g in zip(matrices, gains)]
        units = [g * (1 if s is None else s) for g, s in zip(gains, scales)]
        importances = [None if stats is None else stats.importance().cpu() for stats in (inputs or [None] * len(weights))]
        if any(i is None for i in importances):
            importances = [None] * len(weights)  # weigh all layers or none
        points = torch.cat([(m / u).reshape(-1, settings["dim"]) for m, u in zip(matrices, units)])
        weighting = None if importances[0] is None else torch.cat(
            [(i * u.square()).expand(m.shape).reshape(-1, settings["dim"]) for m, i, u in zip(matrices, importances, units)])
        codebook = _codebooks(points, 1, weighting, 1, settings, seed)  # one tensor for all
        return [_encode(lay, codebook, m, s, g, i) for lay, m, s, g, i in zip(layouts, matrices, scales, gains, importances)]


def _codebooks(matrix: Tensor, unit: Tensor | float, importance: Tensor | None, groups: int, settings: dict,
               seed: int) -> Tensor:
    """(groups, k, d) fp16 codebooks by k-means on the sub-vectors of ``matrix / unit`` (each
    group a contiguous block of rows). With ``importance``, each sub-vector weighs by the mean of
    importance × ``unit``² over its weights: the error counted is the one in the weight, where
    the inputs put it (the exact per-weight weighting then chooses the codes)."""
    rows = len(matrix) // groups
    unit = torch.as_tensor(unit, dtype=torch.float32).reshape(-1, 1).expand(len(matrix), 1)
    books = [kmeans(_sub_vectors(matrix[g * rows:(g + 1) * rows], unit[g * rows:(g + 1) * rows],
                                 None if importance is None else importance.expand(matrix.shape)[g * rows:(g + 1) * rows],
                                 settings["dim"]),
                    settings["k"], seed, settings["iterations"], settings["max_points_per_centroid"])
             for g in range(groups)]
    return torch.from_numpy(np.stack(books)).half()


def _sub_vectors(matrix: Tensor, unit: Tensor, importance: Tensor | None, dim: int) -> PointSource:
    """The length-``dim`` sub-vectors of the rows of ``matrix / unit`` ((rows, 1) units), weighted by
    the mean of importance × unit² over each, read a few rows at a time: no normalised copy of a
    token embedding, only of the sample k-means fits."""
    per_row = matrix.shape[1] // dim

    def rows_of(start: int, stop: int) -> tuple[Tensor, Tensor | None]:
        first, last = start // per_row, -(-stop // per_row)
        points = (matrix[first:last] / unit[first:last]).reshape(-1, dim)
        weights = None if importance is None else (
            importance[first:last] * unit[first:last].square()).reshape(-1, dim).mean(-1)
        offset = slice(start - first * per_row, stop - first * per_row)
        return points[offset], None if weights is None else weights[offset]

    def energies(start: int, stop: int) -> np.ndarray:
        points, weights = rows_of(start, stop)
        return in_memory(points.numpy(), None if weights is None else weights.numpy()).energies(0, stop - start)

    def take(index: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        index = torch.from_numpy(index)
        row, at = index // per_row, (index % per_row)[:, None] * dim + torch.arange(dim)
        points = matrix[row[:, None], at] / unit[row]
        weights = None if importance is None else (importance[row[:, None], at] * unit[row].square()).mean(-1)
        return points.numpy(), None if weights is None else weights.numpy()

    return PointSource(len(matrix) * per_row, energies, take)


def _rms(values: Tensor, rows: bool = False) -> Tensor:
    """Root mean square (of each row, or of all), rounded to fp16 as stored and kept > 0 there."""
    if rows:  # a slice of rows at a time: no squared copy of a whole token embedding
        mean_square = torch.cat([values[part].pow(2).mean(1, keepdim=True) for part in row_slices(*values.shape)])
    else:
        mean_square = values.pow(2).mean()
    return mean_square.sqrt().half().float().clamp_min(2**-24)


def _encode(layout: CodeLayout, codebook: Tensor, matrix: Tensor, scale: Tensor | None,
            gain: Tensor | None = None, importance: Tensor | None = None, perm: Tensor | None = None) -> CodedWeight:
    """The coded weight, its codes assigned against the stored (fp16) codebook, scales and gain
    (weighted by ``importance`` when given), so decoding gives what was chosen. ``matrix`` and
    ``importance`` are in the original row order, ``scale`` in the stored one (``perm``'s)."""
    unassigned = torch.zeros(layout.rows, layout.segments, dtype=torch.uint8)  # any code; 1 byte each
    code = CodedWeight.encode(layout, codebook, unassigned, scale, gain=gain, perm=perm)
    code.reassign(matrix, importance)
    return code


register(KMeans())
