"""``jlcm``: jointly learnable codebooks and mappings, fitted to the layer's calibration inputs.

1. **Grouping.** Rows whose weight distributions are alike share a codebook: each row is
   described by quantiles of its values (over its RMS when rows get their own scale); rows are
   sorted along the first principal component of those statistics and cut
   into ``groups`` equal contiguous groups. The permutation is stored bit-packed
   (⌈log2 rows⌉ bits per row, counted); which codebook a row uses follows from its position,
   so no per-weight codebook index is stored. ``grouping="none"`` keeps the rows in place.
2. **Codebooks.** One (fp16) codebook per group, optionally with one fp16 scale per row.
3. **Start** from k-means weighted by the input energy (the diagonal of the inputs' Gram
   matrix G), then **learn codebooks, scales and mappings jointly** by Adam on the layer's
   output error on the calibration inputs, tr((Ŵ − W) G (Ŵ − W)ᵀ). Each sub-vector keeps its
   ``candidates`` nearest codewords with learned logits α; its value is the softmax mixture
   Σ p_j c_j, p = softmax(α / τ), with τ annealed so that the mixture ends one-hot; the last
   20% of the steps tune codebooks and scales to the final, hard mapping.
4. **The mapping's gradient** (``gradient``): the plain one, ∂ŵ/∂α_j = p_j (c_j − ŵ) / τ,
   grows with the distance of the codeword and so favours jumps to far codewords; the
   *proximal* one multiplies it by exp(−‖c_j − ŵ‖² / 2σ²) (σ² the mean squared distance of the
   candidates), so assignments move between neighbouring codewords; ``ste`` uses the hard
   (argmax) codeword in the forward pass and the plain gradient in the backward one.

Without calibration inputs the error is unweighted (G = I). An embedding's error is diagonal
(each row counts by how often it is looked up): its weighted k-means start is kept as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ..calibrate import InputStatistics
from ..codebook import nearest_candidates
from ..coded import CodedWeight, CodeLayout, row_slices
from ..errors import VQCError
from . import MethodConfig, register
from .kmeans import KMeans, KMeansConfig, _codebooks, _encode, _rms

STEPS = 10  # joint-learning steps: 40 gave no better MiniLM cosine (docs/methods.md), in twice the time
DEFAULT_GROUPS = 4  # codebooks per layer unless asked: the most of 1 … 4 that divides the rows
TUNE_HARD = 0.2  # share of the steps spent on codebooks and scales with the mapping fixed
TEMPERATURES = (1.0, 0.02)  # τ at the first step and at the switch to the hard mapping
START = {"iterations": 12, "max_points_per_centroid": 128}  # the k-means start, unless the settings say


@dataclass(frozen=True)
class JLCMConfig(MethodConfig):
    """``dim`` and ``k`` (default: from the budget), ``groups`` (codebooks per layer; default the
    most of 1 … 4 that divides the rows), ``scale`` (default "row"), ``grouping`` ("stats": rows
    sorted by distribution; "none"), the mapping ``gradient``, joint-learning ``steps`` and ``lr``,
    ``candidates`` codewords per sub-vector."""

    method: ClassVar[str] = "jlcm"
    minimum: ClassVar[dict[str, float]] = {"dim": 1, "k": 2, "groups": 1, "steps": 0, "lr": 0, "candidates": 1}
    dim: int | None = None
    k: int | None = None
    groups: int | None = None
    scale: Literal["none", "row"] | None = None
    grouping: Literal["stats", "none"] | None = None
    gradient: Literal["proximal", "soft", "ste"] | None = None
    steps: int | None = None
    lr: float | None = None
    candidates: int | None = None


class JLCM:
    name = "jlcm"
    config = JLCMConfig
    learns_assignments = False  # it learns them itself, on calibration inputs, before any fine-tuning
    needs_training = False
    calibrates = True  # made for fitting to calibration inputs (said when run without them)

    def settings(self, shape: tuple[int, ...], bits: float | None, config: JLCMConfig) -> dict:
        groups = config.groups or max(g for g in range(1, DEFAULT_GROUPS + 1) if shape[0] % g == 0)
        if shape[0] % groups:
            raise VQCError(f"jlcm groups = {groups} must divide the {shape[0]} rows")
        base = KMeans().settings(shape, bits, KMeansConfig(dim=config.dim, k=config.k, groups=groups,
                                                           scale=config.scale or "row"))
        return {"dim": base["dim"], "k": base["k"], "groups": groups, "scale": base["scale"],
                "grouping": config.grouping or "stats", "gradient": config.gradient or "proximal",
                "steps": STEPS if config.steps is None else config.steps, "lr": config.lr or 2e-2,
                "candidates": min(config.candidates or 4, base["k"])}

    @staticmethod
    def quick_settings(settings: dict) -> dict:
        """For the model-average budget's measurements: the same groups and scales, the k-means
        start alone (its grouping is what its levels buy; a one-codebook fit would not see it)."""
        return settings | {"steps": 0, "iterations": 3, "max_points_per_centroid": 64}

    def layout(self, shape: tuple[int, ...], settings: dict) -> CodeLayout:
        layout = CodeLayout(tuple(shape), k=settings["k"], dim=settings["dim"], groups=settings["groups"],
                            scale_group=math.prod(shape[1:]) if settings["scale"] == "row" else None,
                            permuted=settings["grouping"] == "stats" and settings["groups"] > 1)
        layout.validate()
        if layout.rows * layout.segments // layout.groups < layout.k:
            raise VQCError(f"k = {layout.k} codewords exceed the sub-vectors of each of the {layout.groups} groups of "
                           f"shape {layout.shape}: lower k, d or groups")
        return layout

    def fit(self, weight: Tensor, settings: dict, seed: int, inputs: InputStatistics | None = None) -> CodedWeight:
        layout = self.layout(tuple(weight.shape), settings)
        matrix = weight.reshape(layout.rows, layout.cols).float()
        stats = inputs or InputStatistics(gram=torch.eye(layout.cols, device=matrix.device))
        perm = group_rows(matrix, layout.groups, by_magnitude=settings["scale"] != "row") if layout.permuted else None
        if stats.row_weight is not None and perm is not None:
            stats = InputStatistics(row_weight=stats.row_weight[perm])
        rows = matrix if perm is None else matrix[perm]
        codebook, scale = _start(rows, stats, layout, settings, seed)
        if stats.gram is None or settings["steps"] == 0:  # nothing to learn: the nearest codewords
            # (an embedding's error is each row's own, which weighted k-means already minimises)
            del rows  # reassigning reads the original rows: no second copy of a token table
            original = None if inputs is None else inputs.importance().cpu()
            return _encode(layout, codebook.cpu(), matrix.cpu(), None if scale is None else scale.cpu(),
                           importance=original, perm=perm)
        codes, codebook, scale = learn(rows, stats, layout, codebook.float(), scale, settings)
        return CodedWeight.encode(layout, codebook, codes, scale, perm=perm)


def _start(rows: Tensor, stats: InputStatistics, layout: CodeLayout, settings: dict,
           seed: int) -> tuple[Tensor, Tensor | None]:
    """The codebooks by weighted k-means and the row scales (when rows are scaled) of the stored
    rows: where joint learning starts."""
    scale = _rms(rows.cpu(), rows=True).to(rows.device) if settings["scale"] == "row" else None
    importance = stats.importance().expand(rows.shape)
    codebook = _codebooks(rows.cpu(), 1 if scale is None else scale.cpu(), importance.cpu(), layout.groups,
                          START | settings, seed).to(rows.device)
    return codebook, scale


def group_rows(matrix: Tensor, groups: int, by_magnitude: bool) -> Tensor:
    """Row order that makes rows of alike distribution contiguous: sorted along the first
    principal component of each row's quantiles (of the row itself when its group's codebook
    must cover its magnitude, of the row over its RMS when rows are scaled). Returns original
    row numbers."""
    levels = torch.tensor([0.02, 0.1, 0.25, 0.5, 0.75, 0.9, 0.98], device=matrix.device)

    def quantiles(rows: Tensor) -> Tensor:
        rows = rows if by_magnitude else rows / rows.square().mean(1, keepdim=True).sqrt().clamp_min(1e-12)
        return torch.quantile(rows, levels, dim=1).T

    features = torch.cat([quantiles(matrix[part]) for part in row_slices(*matrix.shape)])  # no copy of an embedding
    features = features - features.mean(0)
    direction = torch.linalg.svd(features, full_matrices=False).Vh[0]
    direction = direction * direction[-1].sign()  # the SVD's sign is arbitrary: fix it, same file every run
    return torch.argsort(features @ direction, stable=True)


def _argmax_codeword(logits: Tensor, candidates: Tensor) -> Tensor:
    """Each sub-vector's candidate of largest logit: (..., n) logits, (..., n, d) candidates → (..., d)."""
    index = logits.argmax(-1)[..., None, None].expand(*logits.shape[:-1], 1, candidates.shape[-1])
    return candidates.gather(-2, index).squeeze(-2)


class _Mixture(torch.autograd.Function):
    """ŵ = Σ_j p_j c_j over each sub-vector's candidate codewords, with the mapping gradient of
    ``gradient`` (see the module docstring)."""

    @staticmethod
    def forward(ctx, logits: Tensor, candidates: Tensor, temperature: float, gradient: str) -> Tensor:
        p = torch.softmax(logits / temperature, -1)  # (..., n)
        mixed = (p[..., None] * candidates).sum(-2)  # (..., d)
        ctx.save_for_backward(p, candidates, mixed)
        ctx.temperature, ctx.gradient = temperature, gradient
        return _argmax_codeword(logits, candidates) if gradient == "ste" else mixed

    @staticmethod
    def backward(ctx, grad: Tensor):
        p, candidates, mixed = ctx.saved_tensors
        offset = candidates - mixed[..., None, :]  # c_j − ŵ
        grad_logits = p * (offset * grad[..., None, :]).sum(-1) / ctx.temperature
        if ctx.gradient == "proximal":
            distance = offset.square().sum(-1)
            grad_logits = grad_logits * torch.exp(-distance / (2 * distance.mean().clamp_min(1e-20)))
        return grad_logits, p[..., None] * grad[..., None, :], None, None


def learn(rows: Tensor, stats: InputStatistics, layout: CodeLayout, codebook: Tensor, scale: Tensor | None,
          settings: dict) -> tuple[Tensor, Tensor, Tensor | None]:
    """Jointly learn codebooks, scales and mappings on the output error; returns (codes, codebook,
    scale) of the stored rows."""
    steps, n, dim = settings["steps"], settings["candidates"], layout.dim
    unit = torch.ones_like(rows) if scale is None else scale.expand_as(rows)
    per_group = layout.rows // layout.groups
    group_of_row = torch.arange(layout.rows, device=rows.device) // per_group
    points = (rows / unit).reshape(layout.rows, layout.segments, dim)
    weights = (stats.importance().expand_as(rows) * unit.square()).reshape(layout.rows, layout.segments, dim)
    candidates, distances = nearest_candidates(points, weights, codebook, group_of_row, n)  # (rows, segments, n) each
    gaps = distances - distances[..., :1]
    logits = -gaps / gaps.mean().clamp_min(1e-20)
    codebook = codebook.clone().requires_grad_(True)
    logits = logits.requires_grad_(True)
    log_scale = None if scale is None else scale.log().clone().requires_grad_(True)
    parameters = [p for p in (codebook, logits, log_scale) if p is not None]
    optimizer = torch.optim.Adam(parameters, lr=settings["lr"])
    reference = stats.error(rows).clamp_min(1e-20)
    switch = round(steps * (1 - TUNE_HARD))

    def decoded(hard: bool, temperature: float) -> Tensor:
        chosen = codebook[group_of_row[:, None, None], candidates]  # (rows, segments, n, d)
        if hard:
            values = _argmax_codeword(logits, chosen)
        else:
            values = _Mixture.apply(logits, chosen, temperature, settings["gradient"])
        values = values.reshape(layout.rows, layout.cols)
        return values if log_scale is None else values * log_scale.exp()

    first, last = TEMPERATURES
    for step in range(steps):
        temperature = first * (last / first) ** (step / max(1, switch))
        for group in optimizer.param_groups:  # cosine decay: the last, hard steps settle
            group["lr"] = settings["lr"] * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = stats.error(decoded(step >= switch, temperature) - rows) / reference
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step >= switch:
            logits.grad = None  # the mapping is fixed from here on
        optimizer.step()
    codes = candidates.gather(-1, logits.argmax(-1, keepdim=True)).squeeze(-1)
    final_scale = None if log_scale is None else log_scale.detach().exp()
    return codes, codebook.detach(), final_scale


register(JLCM())
