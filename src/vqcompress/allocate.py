"""A bit budget is the model's average: sensitive layers get more bits, robust ones fewer.

For every layer and every index budget in ``levels(bits)`` the method's own settings give a layout
whose exact storage (codes, codebooks, scales, permutation) is known before any fitting; a
quick input-weighted k-means on a sample of the layer's rows measures its output error on the
calibration data, relative to the layer's output energy. The choice minimises the summed
relative error under the budget: every layer starts at its cheapest level and the upgrade with
the largest error drop per extra bit is taken while the budget allows (the greedy Lagrangian
walk along each layer's lower convex hull). Everything else the file stores (norms, biases,
layers left dense) is charged to the budget first, so ``--bits 2`` means 2 bits per weight for
the whole model as the report counts it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibrate import InputStatistics
from .coded import CodedWeight, CodeLayout, row_slices
from .errors import VQCError
from .io import DTYPE_BYTES, file_bytes, layer_entry, model_tensors, shapes_of
from .source import source_of

LEVELS = (1.0, 1.5, 2.0, 3.0, 4.0)
HIGH_LEVELS = (5.0, 6.0, 8.0)  # offered where the budget is at least half of them (``levels``)
NOISE = 0.03  # relative weight noise that probes a layer's sensitivity: small, so the response is quadratic
SAMPLE_ROWS = 1024  # rows the sensitivity fit sees: enough for a stable error ratio, fast
HEADER_MARGIN = 1.02  # the header estimate's slack for digits the allocation changes (k, d, offsets)


@dataclass
class Option:
    """One way to code a layer: its settings, exact stored bits and measured relative error."""

    settings: dict
    bits: int
    error: float


def sensitivities(jobs: list, statistics: dict[str, InputStatistics], loss: Callable[[], float],
                  seed: int = 0, progress: bool = False) -> list[float]:
    """How much the model's output loss grows per unit of each layer's relative output error:
    each weight in turn gets a small relative noise, ``loss()`` measures the model's distance to
    its uncompressed outputs, and the ratio to the noise's relative output error is the layer's
    gain. A layer's relative error then counts in proportion to what it does to the output.
    An embedding's kept rows (``keep_rows``: its most used ones, stored apart in int8) get no noise and
    do not count: the error its codes leave is on the other rows."""
    gains = []
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for job in tqdm(jobs, desc="sensitivity", unit="layer", disable=not progress, leave=False):
            weight = job.module.weight
            flat = weight.reshape(len(weight), -1)
            noise = torch.empty_like(weight)
            flat_noise = noise.reshape(len(weight), -1)
            for rows in row_slices(*flat.shape):  # drawn a slice at a time: no second temporary as large as a token table
                flat_noise[rows] = NOISE * flat[rows] * torch.randn(flat[rows].shape, generator=generator).to(weight)
            stats = statistics.get(job.name) or InputStatistics(gram=torch.eye(weight[0].numel(), device=weight.device))
            coded = torch.ones(len(weight), dtype=torch.bool, device=weight.device)
            if getattr(job, "kept", 0):
                coded[stats.heaviest_rows(flat, job.kept)] = False
                noise[~coded] = 0
            errors = [stats.row_errors_in_slices(lambda rows: m[rows], *m.shape, m.device)[coded].sum() for m in (flat_noise, flat)]
            relative = float(errors[0] / errors[1].clamp_min(1e-30))
            weight.add_(noise)
            try:
                gains.append(loss() / max(relative, 1e-30))
            finally:
                weight.sub_(noise)
    return gains


def levels(bits: float, floor: bool = True) -> tuple[float, ...]:
    """The index budgets each layer is measured at: ``LEVELS`` from one bit under the model's
    budget (in whole bits; all of them without ``floor``), and above them those of
    ``HIGH_LEVELS`` up to twice it, so that a high budget is not capped at 4. The floor is there
    because the summed-error model holds for small errors only: a large layer it finds cheap to
    ruin (docs/methods.md, "Real pretrained networks") ruins the whole network."""
    lowest = math.floor(bits) - 1 if floor else 0
    return tuple(level for level in LEVELS if level >= lowest) + tuple(level for level in HIGH_LEVELS if level <= 2 * bits)


def _cheapest(jobs: list, budgets: tuple[float, ...]) -> int:
    return sum(min((layout.nbits() for _, layout in _level_settings(job, budgets)), default=0) for job in jobs)


def _fitting_levels(jobs: list, bits: float, available: float) -> tuple[float, ...]:
    """``levels(bits)``, or, where the budget cannot pay for the floor (a small model's codebooks
    and scales weigh a lot), every level."""
    floored = levels(bits)
    return floored if _cheapest(jobs, floored) <= available else levels(bits, floor=False)


def allocate(jobs: list, statistics: dict[str, InputStatistics], bits: float, available: float, seed: int = 0,
             gains: list[float] | None = None, progress: bool = False) -> list[Option]:
    """The option each job gets so that the model averages at most ``bits`` per weight (its coded
    layers spending at most ``available`` bits: ``check_budget``), minimising the sum of relative
    errors times each layer's gain (``sensitivities``; 1 each by default)."""
    budgets = _fitting_levels(jobs, bits, available)
    options = [_options(job, statistics.get(job.name), seed, gain, budgets)
               for job, gain in tqdm(list(zip(jobs, gains or [1.0] * len(jobs))), desc="bit levels", unit="layer",
                                     disable=not progress, leave=False)]
    chosen = [0] * len(jobs)
    spent = sum(o[0].bits for o in options)
    while True:
        best = None
        for i, layer_options in enumerate(options):
            current = layer_options[chosen[i]]
            for j in range(chosen[i] + 1, len(layer_options)):
                extra = layer_options[j].bits - current.bits
                gain = (current.error - layer_options[j].error) / extra
                if spent + extra <= available and (best is None or gain > best[0]):
                    best = (gain, i, j, extra)
        if best is None or best[0] <= 0:
            return [layer_options[c] for layer_options, c in zip(options, chosen)]
        _, i, j, extra = best
        chosen[i], spent = j, spent + extra


def check_budget(model: nn.Module, jobs: list, bits: float) -> float:
    """The bits the coded layers may spend for the file to average ``bits`` per weight of the
    model, once everything else it stores is paid for (tensors left dense, the header and
    manifest: ``header_bytes``); an error, before any measuring, where even each layer's cheapest
    coding does not fit."""
    tensors, aliases = model_tensors(model)
    coded_names = {job.name + ".weight" for job in jobs}
    parameters = _parameters(tensors)
    fixed = sum(t.numel() * t.element_size() * 8 for n, t in tensors.items() if n not in coded_names)
    fixed += 8 * header_bytes(model, jobs, tensors, aliases)
    available = bits * parameters - fixed
    cheapest = _cheapest(jobs, levels(bits, floor=False))
    if cheapest > available:
        raise VQCError(f"{bits} bits per weight cannot hold this model: its cheapest coding takes "
                       f"{(cheapest + fixed) / parameters:.3f} (layers left dense and the file's header included)")
    return available


def ceiling(model: nn.Module, jobs: list, bits: float, available: float) -> float:
    """The most bits per weight a file can reach under a model average of ``bits`` (the coded
    layers spending at most ``available``: ``check_budget``): each layer at its dearest level.
    A budget above it is not spent (``compress`` says so)."""
    most = sum(max((layout.nbits() for _, layout in _level_settings(job, levels(bits))), default=0) for job in jobs)
    return bits - max(available - most, 0) / _parameters(model_tensors(model)[0])


def _parameters(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors.values() if t.is_floating_point())


def header_bytes(model: nn.Module, jobs: list, tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> int:
    """The file's bytes beyond its tensors (safetensors' tensor table and the manifest) for the
    jobs' present settings, with a margin for the digits the allocation may still change."""
    shapes = shapes_of({name: t for name, t in tensors.items() if name not in {job.name + ".weight" for job in jobs}})
    layers = {}
    for job in jobs:
        layout = replace(job.method.layout(tuple(job.module.weight.shape), job.settings), kept_rows=job.kept)
        code = CodedWeight.empty(layout)
        shapes |= shapes_of({f"{job.name}.weight_code.{name}": b for name, b in code.state_dict().items()})
        layers[job.name] = layer_entry(job.module, layout, {"method": job.method.name, **job.settings})
    manifest = {"format": "vqc", "format_version": 0, "library_version": "0.0.0", "layers": layers, "aliases": aliases,
                "source": source_of(model).to_json(), "payload_sha256": "0" * 64}
    payload = sum(DTYPE_BYTES[dtype] * math.prod(shape) for dtype, shape in shapes.values())
    return round((file_bytes(shapes, manifest) - payload) * HEADER_MARGIN) + 1024


def _level_settings(job, budgets: tuple[float, ...] = LEVELS) -> list[tuple[dict, CodeLayout]]:
    """The distinct (settings, layout) the job's method gives at the ``budgets`` it can meet (only
    at its own budget where the plan pinned one)."""
    if getattr(job, "pinned_bits", None) is not None:
        budgets = (job.pinned_bits,)
    shape, found = tuple(job.module.weight.shape), []
    for level in budgets:
        try:
            settings = job.method.settings(shape, level, job.config)
            layout = replace(job.method.layout(shape, settings), kept_rows=getattr(job, "kept", 0))
        except VQCError:
            continue
        if all(settings != known for known, _ in found):
            found.append((settings, layout))
    return found


def has_levels(job) -> bool:
    """Whether the job's method codes its layer differently at different budgets (a universal
    codebook, say, has one cost): only then is there a budget to spread."""
    return len(_level_settings(job)) > 1


def _options(job, inputs: InputStatistics | None, seed: int, gain: float,
             budgets: tuple[float, ...] = LEVELS) -> list[Option]:
    """The job's options by level, cheapest first, each dearer one strictly better (the hull)."""
    found = [Option(settings, CodedWeight.empty(layout).nbits(), gain * _measure(job, inputs, settings, layout, seed))
             for settings, layout in _level_settings(job, budgets)]
    if not found:
        raise VQCError(f"{job.name}: no bit level in {budgets} fits shape {tuple(job.module.weight.shape)}")
    found.sort(key=lambda o: o.bits)
    hull = [found[0]]
    for option in found[1:]:
        if option.error < hull[-1].error:
            hull.append(option)
    return hull


def _measure(job, inputs: InputStatistics | None, settings: dict, layout: CodeLayout, seed: int) -> float:
    """Relative output error on sampled rows of a quick fit: the method's own where it offers
    one (``quick_settings``), else a weighted k-means with the layout's d, k and row scaling."""
    from .methods.kmeans import KMeans

    weight = job.module.weight.detach().float().reshape(job.module.weight.shape[0], -1)
    stats = inputs or InputStatistics(gram=torch.eye(weight.shape[1]))
    own = hasattr(job.method, "quick_settings")
    groups = layout.groups if own else 1
    rows = _sample_rows(weight, stats, seed, layout.kept_rows)
    rows = rows[:len(rows) - len(rows) % groups]  # whole groups of rows
    sample = stats if stats.gram is not None else InputStatistics(row_weight=stats.row_weight[rows])
    k = min(layout.k, len(rows) * layout.segments // groups)
    if own:
        method, quick = job.method, job.method.quick_settings(settings) | {"k": k}
    else:
        method, quick = KMeans(), {"dim": layout.dim, "k": k, "groups": 1, "shared": 0, "iterations": 3,
                                   "scale": "row" if layout.scale_group == layout.cols else "none",
                                   "max_points_per_centroid": 64}
    code = method.fit(weight[rows], quick, seed, sample)
    difference = code.decode().reshape(len(rows), -1) - weight[rows]
    return float(sample.error(difference) / sample.error(weight[rows]).clamp_min(1e-30))


def _sample_rows(weight: torch.Tensor, stats: InputStatistics, seed: int, kept: int = 0) -> torch.Tensor:
    """Rows the sensitivity fit uses: all of a small layer; of an embedding its most used rows
    but the ``kept`` ones (which will be stored apart: its error lands on the next ones); of any
    other layer an even random sample."""
    rows = weight.shape[0]
    if rows <= SAMPLE_ROWS:
        return torch.arange(rows)
    if stats.gram is None:
        weights = stats.row_weight.clone()
        weights[stats.heaviest_rows(weight, kept)] = -1
        return weights.topk(min(rows - kept, SAMPLE_ROWS)).indices.sort().values
    return torch.randperm(rows, generator=torch.Generator().manual_seed(seed))[:SAMPLE_ROWS].sort().values


def describe(jobs: list, options: list[Option]) -> str:
    """The allocation as a table: each layer's bits per weight and share of the coded bits."""
    total = sum(o.bits for o in options)
    lines = [f"{'layer':<48} {'bits/w':>7} {'share':>6} {'weighted error':>14}"]
    for job, option in zip(jobs, options):
        weights = math.prod(job.module.weight.shape)
        lines.append(f"{job.name:<48} {option.bits / weights:>7.3f} {100 * option.bits / total:>5.1f}% {option.error:>14.3g}")
    return "\n".join(lines)
