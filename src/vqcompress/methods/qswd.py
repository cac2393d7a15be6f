"""``qswd``: quantized sparse weight decomposition, W ≈ Z · C.

The weight (each row over its RMS) is cut into N sub-vectors of length d along the inputs (the
rows of W in the factor form); each is ``Σ_t z_t · C[p_t]`` over ``terms`` (s) distinct
codewords of a k × d dictionary C (``coded.py`` stores it). Special cases: s = 1 with unit
coefficients is k-means VQ; a dense, unquantized Z with k < d is a truncated SVD; real
coefficients with s < k are sparse PCA.

Fitting minimises each row's relative error, or with calibration data the output error (each
weight's error times its input's energy Σx²): C starts from weighted k-means (or the top right singular vectors, k ≤ d), Z from
orthogonal matching pursuit. Then, ``iterations`` times, projected gradient descent: C by
least squares (the gradient step with the exact step length), Z by a gradient step projected
onto its s largest entries per row, its coefficients then refitted on that support (hard
thresholding pursuit; a sub-vector keeps its old support when the new one is worse, so the
error never grows). Last, the projections onto the quantization grids: coefficients onto
odd multiples of a per-row step (the row scale), C onto its b_c-bit grid, each refitted to
the other twice; the row scales by least squares. Unit coefficients (b_z = 0) replace the
gradient step by a greedy choice of s distinct codewords (Lloyd's algorithm when s = 1).

``--bits`` picks (d, k, s, b_z) from ``RATE_TABLE`` and says which; the options override it.
Fine-tuning then trains C, the coefficients and the row scales through the grid projections
(straight through) with the positions fixed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from ..calibrate import InputStatistics
from ..codebook import kmeans, weighted_distances
from ..coded import (
    FP16_COEFFICIENTS,
    MAX_GRID_BITS,
    CodedWeight,
    CodeLayout,
    best_grid_step,
    codebook_grid_scale,
    grid_levels,
    grid_values,
    row_slices,
)
from ..errors import Unfit, VQCError
from . import MethodConfig, register

CHUNK = 1 << 15  # sub-vectors per step: bounds the (chunk × k) gradient
GRID_ROUNDS = 2  # coefficient ↔ codebook refits on their grids
GRID_CANDIDATES = 8  # codewords a term weighs on the grid: the best ones for a real coefficient
RIDGE = 1e-6

#: Index bits per weight (positions and coefficients, no codebook or scales) → (d, k, s, b_z).
#: Plain VQ at the shortest d that a codebook of ≤ 256 codewords allows (a scalar one from 5
#: bits): on MiniLM's first feed-forward layer it had the least weight error at every rate
#: where one was measured against the factor form (docs/methods.md), and a quantized gain per
#: sub-vector (s = 1, b_z = 2), better on that layer at 5 bits, lost on the whole model
#: (cosine 0.847 against 0.959 at 4 bits, with the fit's earlier RMS² row weighting). Other
#: forms: the options.
RATE_TABLE: list[tuple[float, tuple[int, int, int, int]]] = [
    (0.375, (16, 64, 1, 0)),
    (0.5, (16, 256, 1, 0)),
    (0.625, (8, 32, 1, 0)),
    (0.75, (8, 64, 1, 0)),
    (1.0, (8, 256, 1, 0)),
    (1.25, (4, 32, 1, 0)),
    (1.5, (4, 64, 1, 0)),
    (1.75, (4, 128, 1, 0)),
    (2.0, (4, 256, 1, 0)),
    (2.5, (2, 32, 1, 0)),
    (3.0, (2, 64, 1, 0)),
    (3.5, (2, 128, 1, 0)),
    (4.0, (2, 256, 1, 0)),
    (5.0, (1, 32, 1, 0)),
    (6.0, (1, 64, 1, 0)),
]


@dataclass(frozen=True)
class QSWDConfig(MethodConfig):
    """``dim``, ``k``, ``terms`` (s) and ``coef_bits`` (b_z; default: from the budget's
    ``RATE_TABLE`` row), ``codebook_bits`` (b_c, default 8), ``init`` ("kmeans" or "svd"),
    projected-gradient ``iterations`` (default 4), ``scale`` ("row" or "none")."""

    method: ClassVar[str] = "qswd"
    minimum: ClassVar[dict[str, float]] = {"dim": 1, "k": 2, "terms": 1, "coef_bits": 0, "codebook_bits": 0,
                                           "iterations": 0}
    dim: int | None = None
    k: int | None = None
    terms: int | None = None
    coef_bits: int | None = None
    codebook_bits: int | None = None
    init: Literal["kmeans", "svd"] | None = None
    iterations: int | None = None
    scale: Literal["row", "none"] | None = None


class QSWD:
    name = "qswd"
    config = QSWDConfig
    learns_assignments = False  # positions stay as fitted; codebook, coefficients and scales train
    needs_training = False

    def settings(self, shape: tuple[int, ...], bits: float | None, config: QSWDConfig) -> dict:
        cols = math.prod(shape[1:])
        given = {key: value for key, value in config.given().items() if key in ("dim", "k", "terms", "coef_bits")}
        if bits is None and len(given) < 4:
            raise VQCError("qswd needs --bits, or all of dim, k, terms and coef_bits (-O terms=… -O coef_bits=…)")
        if bits is not None and bits <= 0:
            raise VQCError(f"a bit budget must be positive, got {bits}")
        picked = given if len(given) == 4 else self._from_budget(bits, shape, given, config)
        settings = {
            "scale": config.scale or "row", **picked,
            "codebook_bits": 8 if config.codebook_bits is None else config.codebook_bits,
            "init": config.init or "kmeans", "iterations": 4 if config.iterations is None else config.iterations,
        }
        if settings["init"] == "svd" and settings["k"] > settings["dim"]:
            raise VQCError(f"an SVD start needs k ≤ d, got k = {settings['k']}, d = {settings['dim']}")
        if settings["scale"] == "none" and 0 < settings["coef_bits"] <= MAX_GRID_BITS:
            raise VQCError("coefficients on a grid need row scales (their step): drop scale=none or use coef_bits 0 or 16")
        if settings["terms"] > settings["k"]:
            raise VQCError(f"s = {settings['terms']} terms per sub-vector exceed the k = {settings['k']} codewords")
        if cols % settings["dim"]:
            raise VQCError(f"d = {settings['dim']} does not divide the {cols} inputs of shape {tuple(shape)}")
        cost = self.bits_per_weight(shape, settings)
        if bits is not None and cost > bits + 1e-9:
            raise VQCError(f"qswd with d={settings['dim']}, k={settings['k']}, s={settings['terms']}, "
                           f"b_z={settings['coef_bits']}, b_c={settings['codebook_bits']} costs {cost:.3f} bits per weight "
                           f"on shape {tuple(shape)}, above its budget of {bits:g} bits per weight")
        return settings

    @staticmethod
    def bits_per_weight(shape: tuple[int, ...], settings: dict) -> float:
        """The exact cost: positions, coefficients, codebook (and its scale) and row scales."""
        return _layout(shape, settings).nbits() / math.prod(shape)

    def _from_budget(self, bits: float, shape: tuple[int, ...], given: dict, config: QSWDConfig) -> dict:
        """The richest ``RATE_TABLE`` row whose total cost on this layer fits the budget (the
        codebook and scales counted), with any option the user gave kept; on a layer too small
        for a row's codebook, that row with fewer codewords, then without row scales."""
        cols, codebook_bits = math.prod(shape[1:]), 8 if config.codebook_bits is None else config.codebook_bits
        for rate, row in reversed(RATE_TABLE):
            picked = dict(zip(("dim", "k", "terms", "coef_bits"), row)) | given
            if rate > bits and not given:
                continue
            while cols % picked["dim"] and "dim" not in given:
                picked["dim"] //= 2
            scales = [config.scale] if config.scale else ["row", "none"][:1 + (picked["coef_bits"] in (0, 16))]
            ks = [picked["k"]] if "k" in given else [picked["k"] >> i for i in range(int(math.log2(picked["k"])))]
            for scale, k in ((scale, k) for scale in scales for k in ks if k >= picked["terms"]):
                candidate = picked | {"k": k, "scale": scale, "codebook_bits": codebook_bits}
                if (shape[0] * cols // picked["dim"] >= k
                        and self.bits_per_weight(shape, candidate) <= bits + 1e-9):
                    return picked | {"k": k, "scale": scale}
        raise Unfit(f"no qswd setting fits {bits} bits per weight on shape {tuple(shape)} with its codebook and "
                    f"row scales counted: raise --bits or set dim, k, terms and coef_bits")

    @staticmethod
    def quick_settings(settings: dict) -> dict:
        """For the model-average budget's measurements: the same form, fitted in one pass."""
        return settings | {"iterations": 1}

    def layout(self, shape: tuple[int, ...], settings: dict) -> CodeLayout:
        layout = _layout(shape, settings)
        layout.validate()
        if layout.rows * layout.segments < layout.k:
            raise VQCError(f"k = {layout.k} codewords exceed the {layout.rows * layout.segments} sub-vectors of shape "
                           f"{layout.shape}: lower k or d")
        return layout

    def fit(self, weight: Tensor, settings: dict, seed: int, inputs: InputStatistics | None = None) -> CodedWeight:
        layout = self.layout(tuple(weight.shape), settings)
        matrix = weight.reshape(layout.rows, layout.cols).float().cpu()
        rms = _row_rms(matrix) if layout.scale_group else torch.ones(layout.rows, 1)
        if inputs is None:  # each row's own relative error (a norm after the layer rescales each output)
            weights = torch.ones(layout.rows, layout.cols)
        else:  # the output error, in the weight's units
            importance = inputs.importance().cpu().float()
            weights = (importance / importance.mean().clamp_min(1e-30) * rms.square()).expand(layout.rows, layout.cols)
        problem = Problem(matrix / rms, weights, layout.dim)
        codebook = problem.initial_codebook(layout.k, settings["init"], seed)
        unit = layout.coef_bits == 0
        support, coefs = problem.pursue(codebook, layout.terms, unit)
        for _ in range(settings["iterations"]):
            codebook = problem.codebook_step(support, coefs, codebook)
            support, coefs = problem.support_step(codebook, support, coefs, layout.terms, unit)
        codebook, support, coefs, step = problem.onto_grids(codebook, support, coefs, layout)
        scale = None if layout.scale_group is None else problem.row_scales(codebook, support, coefs, step) * rms
        return CodedWeight.encode(layout, codebook[None], support.reshape(layout.rows, layout.segments, -1), scale,
                                  coefficients=coefs.reshape(layout.rows, layout.segments, -1))


class Problem:
    """Sub-vectors ``points`` (N × d) and their error weights, with the steps that fit Z and C.
    Z is held as ``support`` (N × s positions) and ``coefs`` (N × s values)."""

    def __init__(self, matrix: Tensor, weights: Tensor, dim: int):
        self.rows = matrix.shape[0]
        self.points = matrix.reshape(-1, dim).contiguous()
        self.weights = weights.reshape(-1, dim).contiguous()

    def chunks(self) -> list[slice]:
        return [slice(i, min(i + CHUNK, len(self.points))) for i in range(0, len(self.points), CHUNK)]

    def initial_codebook(self, k: int, init: str, seed: int) -> Tensor:
        """Weighted k-means (faiss), or the top-k right singular vectors of the weighted points."""
        if init == "svd":
            scaled = self.points * self.weights.sqrt()
            _, _, vh = torch.linalg.svd(scaled.T.double() @ scaled.double())
            return vh[:k].float()
        centroids = kmeans(self.points.numpy(), k, seed, weights=self.weights.mean(1).numpy())
        return torch.from_numpy(np.ascontiguousarray(centroids))

    def errors(self, codebook: Tensor, support: Tensor, coefs: Tensor, part: slice) -> Tensor:
        """Weighted squared error of each sub-vector of ``part`` (``support`` and ``coefs`` its own)."""
        approx = (codebook[support] * coefs[..., None]).sum(1)
        return ((self.points[part] - approx).square() * self.weights[part]).sum(1)

    def solve(self, codebook: Tensor, support: Tensor, part: slice) -> Tensor:
        """Least-squares coefficients of each sub-vector of ``part`` on its given support."""
        atoms = codebook[support]  # (n, s, d)
        w = self.weights[part]
        gram = torch.einsum("nsd,nd,ntd->nst", atoms, w, atoms)
        target = torch.einsum("nsd,nd->ns", atoms, w * self.points[part])
        return _solve_spd(gram, target[..., None])[..., 0]

    def pursue(self, codebook: Tensor, terms: int, unit: bool) -> tuple[Tensor, Tensor]:
        """Orthogonal matching pursuit (or, with unit coefficients, greedy distinct codewords)."""
        support = torch.empty(len(self.points), terms, dtype=torch.int64)
        coefs = torch.empty(len(self.points), terms)
        for part in self.chunks():
            support[part], coefs[part] = self._pursue_part(codebook, terms, unit, part)
        return support, coefs

    def _pursue_part(self, codebook: Tensor, terms: int, unit: bool, part: slice) -> tuple[Tensor, Tensor]:
        points, w = self.points[part], self.weights[part]
        residual, support = points, torch.empty(len(points), terms, dtype=torch.int64)
        energy = None if unit else (w @ codebook.square().T).clamp_min(1e-30)  # (n, k): weighted |c|²
        chosen = torch.zeros(len(points), codebook.shape[0], dtype=torch.bool) if terms > 1 else None
        for t in range(terms):
            cost = (weighted_distances(residual, w, codebook) if unit  # lower is better
                    else ((w * residual) @ codebook.T).square_().div_(energy).neg_())
            if t:
                cost.masked_fill_(chosen, math.inf)
            support[:, t] = cost.argmin(1)
            coefs = torch.ones(len(points), t + 1) if unit else self.solve(codebook, support[:, :t + 1], part)
            if t + 1 < terms:
                chosen.scatter_(1, support[:, t:t + 1], True)
                residual = points - (codebook[support[:, :t + 1]] * coefs[..., None]).sum(1)
        return support, coefs

    def codebook_step(self, support: Tensor, coefs: Tensor, codebook: Tensor) -> Tensor:
        """Weighted least squares for C given Z, one k × k system per dimension (a ridge towards
        the current C keeps unused codewords where they are)."""
        k, dim = codebook.shape
        gram = torch.zeros(dim, k * k, dtype=torch.float64)
        target = torch.zeros(dim, k, dtype=torch.float64)
        for part in self.chunks():
            s, z, w = support[part], coefs[part].double(), self.weights[part].double()
            pairs = (s[:, :, None] * k + s[:, None, :]).reshape(-1)
            products = (z[:, :, None] * z[:, None, :]).reshape(len(z), -1)
            gram.index_add_(1, pairs, (products[:, :, None] * w[:, None, :]).reshape(-1, dim).T)
            target.index_add_(1, s.reshape(-1), (z[:, :, None] * (w * self.points[part].double())[:, None, :]).reshape(-1, dim).T)
        gram = gram.reshape(dim, k, k)
        ridge = _ridge(gram)
        solved = _solve_spd(gram, (target + ridge[:, None] * codebook.double().T)[..., None])
        return solved[..., 0].T.float().contiguous()

    def support_step(self, codebook: Tensor, support: Tensor, coefs: Tensor, terms: int, unit: bool) -> tuple[Tensor, Tensor]:
        """One projected gradient step on Z (hard thresholding pursuit), kept where it helps; one
        term is simply the best codeword with its least-squares coefficient."""
        support, coefs = support.clone(), coefs.clone()
        lipschitz = torch.linalg.eigvalsh(codebook.T @ codebook)[-1]  # ‖C‖₂²
        for part in self.chunks():
            residual = self.points[part] - (codebook[support[part]] * coefs[part, :, None]).sum(1)
            if unit or terms == 1:  # the exact best choice (one term), or the greedy one
                new_support, new_coefs = self._pursue_part(codebook, terms, unit, part)
            else:
                dense = torch.zeros(len(residual), codebook.shape[0]).scatter_(1, support[part], coefs[part])
                step = 1 / (lipschitz * self.weights[part].amax(1, keepdim=True)).clamp_min(1e-30)
                dense += step * ((self.weights[part] * residual) @ codebook.T)
                new_support = dense.abs().topk(terms, dim=1).indices
                new_coefs = self.solve(codebook, new_support, part)
            old_error = (residual.square() * self.weights[part]).sum(1)
            better = self.errors(codebook, new_support, new_coefs, part) < old_error
            support[part][better], coefs[part][better] = new_support[better], new_coefs[better]
        return support, coefs

    def onto_grids(self, codebook: Tensor, support: Tensor, coefs: Tensor, layout: CodeLayout) -> tuple[Tensor, Tensor, Tensor]:
        """Project Z and C onto their grids: each row's coefficient step from its real
        coefficients, then, twice, every term re-chosen (codeword and grid coefficient together,
        the others held) and C refitted and projected. Returns C on its grid, the support, the
        coefficients in grid units and each row's step."""
        quantized, step = _coefficients_on_grid(coefs, self.rows, layout.coef_bits)
        per_point = _per_point(step, coefs)
        for _ in range(GRID_ROUNDS):
            if 0 < layout.coef_bits <= MAX_GRID_BITS:
                for part in self.chunks():
                    support[part], quantized[part] = self._terms_on_grid(codebook, support[part], quantized[part],
                                                                         per_point[part], layout.coef_bits, part)
            codebook = _codebook_on_grid(self.codebook_step(support, quantized * per_point, codebook), layout.codebook_bits)
        return codebook, support, quantized, step

    def _terms_on_grid(self, codebook: Tensor, support: Tensor, levels: Tensor, step: Tensor, bits: int,
                       part: slice) -> tuple[Tensor, Tensor]:
        """Each term in turn takes the codeword and grid coefficient that best fit what the other
        terms leave, among its current codeword and the ``GRID_CANDIDATES`` best for real
        coefficients (the current choice is among them, so the error never grows)."""
        points, w = self.points[part], self.weights[part]
        support, levels = support.clone(), levels.clone()
        energy = w @ codebook.square().T  # (n, k)
        approx = (codebook[support] * (levels * step)[..., None]).sum(1)
        for t in range(support.shape[1]):
            residual = points - approx + codebook[support[:, t]] * (levels[:, t:t + 1] * step)
            correlation = (w * residual) @ codebook.T
            taken = torch.zeros_like(correlation, dtype=torch.bool).scatter_(1, support, True)
            taken.scatter_(1, support[:, t:t + 1], False)  # the other terms' codewords
            score = (correlation.square() / energy.clamp_min(1e-30)).masked_fill(taken, -math.inf)
            candidates = torch.cat([support[:, t:t + 1], score.topk(min(GRID_CANDIDATES, score.shape[1]), dim=1).indices], 1)
            c, e = correlation.gather(1, candidates), energy.gather(1, candidates).clamp_min(1e-30)
            grid = grid_values(grid_levels(c / e / step, bits), bits)
            gain = (2 * grid * step * c - (grid * step).square() * e).masked_fill(taken.gather(1, candidates), -math.inf)
            pick = gain.argmax(1, keepdim=True)
            support[:, t:t + 1], levels[:, t:t + 1] = candidates.gather(1, pick), grid.gather(1, pick)
            approx = points - residual + codebook[support[:, t]] * (levels[:, t:t + 1] * step)
        return support, levels

    def row_scales(self, codebook: Tensor, support: Tensor, coefs: Tensor, step: Tensor) -> Tensor:
        """Each row's scale by weighted least squares on its quantized approximation (``step``,
        the coefficient step, where that fails); a slice of rows at a time (a token embedding's
        approximation would be one more copy of the whole table)."""
        points, w = self.points.reshape(self.rows, -1), self.weights.reshape(self.rows, -1)
        segments, factors = len(support) // self.rows, []
        for rows in row_slices(*points.shape):
            part = slice(rows.start * segments, rows.stop * segments)
            approx = (codebook[support[part]] * coefs[part, :, None]).sum(1).reshape(-1, points.shape[1])
            factors.append((w[rows] * points[rows] * approx).sum(1) / (w[rows] * approx.square()).sum(1).clamp_min(1e-30))
        factor = torch.cat(factors)
        return torch.where(factor[:, None] > 0, factor[:, None], step)


def _layout(shape: tuple[int, ...], settings: dict) -> CodeLayout:
    return CodeLayout(tuple(shape), k=settings["k"], dim=settings["dim"], terms=settings["terms"],
                      coef_bits=settings["coef_bits"], codebook_bits=settings["codebook_bits"],
                      scale_group=math.prod(shape[1:]) if settings["scale"] == "row" else None)


def _ridge(gram: Tensor) -> Tensor:
    """A ridge per system, small against its diagonal: a codeword no sub-vector uses stays put."""
    return RIDGE * gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)


def _solve_spd(gram: Tensor, target: Tensor) -> Tensor:
    """Solve the (batched) normal equations ``(gram + ridge) x = target`` by Cholesky."""
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype)
    factor, _ = torch.linalg.cholesky_ex(gram + _ridge(gram)[..., None, None] * eye)
    return torch.cholesky_solve(target, factor)


def _per_point(step: Tensor, coefs: Tensor) -> Tensor:
    """A per-row step (rows × 1) spread over that row's sub-vectors (N × 1)."""
    return step.repeat_interleave(len(coefs) // len(step), dim=0)


def _coefficients_on_grid(coefs: Tensor, rows: int, bits: int) -> tuple[Tensor, Tensor]:
    """Coefficients in grid units and each row's step: odd multiples of the step that fits the
    row best (a search of 0.3 … 1 × absmax / (2^bits − 1)); fp16 numbers; or ones."""
    ones = torch.ones(rows, 1)
    if bits == 0:
        return torch.ones_like(coefs), ones
    if bits == FP16_COEFFICIENTS:
        return coefs.half().float(), ones
    per_row = coefs.reshape(rows, -1)
    step = best_grid_step(per_row, bits, (1,), torch.linspace(0.3, 1.0, 8))
    return grid_values(grid_levels(per_row / step, bits), bits).reshape(coefs.shape), step


def _codebook_on_grid(codebook: Tensor, bits: int) -> Tensor:
    """C projected onto its grid (as ``CodedWeight.encode`` will store it), or left as is."""
    if not bits:
        return codebook
    scale = codebook_grid_scale(codebook[None], bits)[0]
    return grid_values(grid_levels(codebook / scale, bits), bits) * scale


def _row_rms(matrix: Tensor) -> Tensor:
    """Each row's RMS (rows × 1), kept > 0: the units the sub-vectors are fitted in."""
    return matrix.square().mean(1, keepdim=True).sqrt().clamp_min(1e-12)


register(QSWD())
