"""``compress``: plan → per-layer settings (all checked first) → fit → swap in coded layers."""

from __future__ import annotations

import copy
import json
import os
import zlib
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .coded import CodedWeight
from .errors import VQCError
from .finetune import TrainingData, check_assignments, finetune
from .layers import coded_from_dense
from .methods import Method, get_method
from .plan import Plan


@dataclass
class Job:
    name: str
    module: nn.Module
    method: Method
    settings: dict


def _job(name: str, module: nn.Module, spec: dict) -> Job:
    """Resolve a layer's spec into concrete settings, refusing bad weights or budgets up front."""
    spec = dict(spec)
    method = get_method(spec.pop("method"))
    bits = spec.pop("bits", None)
    weight = module.weight.detach()
    if not torch.isfinite(weight.sum()) and not torch.isfinite(weight).all():  # one cheap sum first
        raise VQCError(f"{name}: the weight holds NaN or Inf values; fix the model before compressing it")
    try:
        settings = method.settings(tuple(weight.shape), bits, spec)
        method.layout(tuple(weight.shape), settings).validate()
    except VQCError as error:
        raise VQCError(f"{name}: {error}") from None
    return Job(name, module, method, settings)


def _layer_seed(seed: int, name: str) -> int:
    """A per-layer seed that depends on the layer's name, not on the order of the work."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**31


def fit_layer(job: Job, seed: int) -> CodedWeight:
    code = job.method.fit(job.module.weight.detach().float(), job.settings, _layer_seed(seed, job.name))
    code.recipe = {"method": job.method.name, **job.settings}
    return code


def fit_run(run: list[Job], seed: int) -> list[CodedWeight]:
    """The coded weights of a run of layers: one layer alone, or several sharing one codebook."""
    if len(run) == 1 and not run[0].settings.get("shared"):
        return [fit_layer(run[0], seed)]
    first = run[0]
    codes = first.method.fit_shared([job.module.weight.detach().float() for job in run], first.settings,
                                    _layer_seed(seed, first.name))
    for code in codes:
        code.recipe = {"method": first.method.name, **first.settings}
    return codes


def shared_runs(jobs: list[Job]) -> list[list[Job]]:
    """Jobs in runs that share a codebook. Layers with ``shared = N`` and the same settings (same
    d, k, scale) are cut, in model order, into at most N runs of about equal weight count (VQ-DNN's
    "group number"); every other layer is a run of its own."""
    alike: dict[str, list[Job]] = {}
    runs: list[list[Job]] = []
    for job in jobs:
        if job.settings.get("shared"):
            key = json.dumps([job.method.name, job.settings], sort_keys=True)
            if key not in alike:
                alike[key] = []
                runs.append(alike[key])  # a placeholder, cut below, keeping model order
            alike[key].append(job)
        else:
            runs.append([job])
    return [piece for run in runs for piece in _cut(run, run[0].settings.get("shared") or 1)]


def _cut(jobs: list[Job], pieces: int) -> list[list[Job]]:
    """Contiguous runs of about equal weight count, at most ``pieces`` of them."""
    sizes = [job.module.weight.numel() for job in jobs]
    total, runs, done = sum(sizes), [[]], 0
    for job, size in zip(jobs, sizes):
        if runs[-1] and done >= total * len(runs) / pieces:
            runs.append([])
        runs[-1].append(job)
        done += size
    return runs


def compress(model: nn.Module, method: str = "kmeans", bits: float | None = None,
             calibration: TrainingData | None = None, *, plan: Plan | None = None, seed: int = 0,
             progress: bool = True, finetune_steps: int = 0, lr: float = 1e-3,
             assignments: str = "ste", checkpoint: str | os.PathLike | None = None, **options) -> nn.Module:
    """Replace the planned layers of ``model`` (in place) by coded layers; returns the model
    (a new object only when ``model`` is itself a single layer).

    With ``finetune_steps`` and ``calibration`` (a task and its batches), the compressed model is
    then distilled from a copy of the original by the shared fine-tuning engine (methods that learn
    assignments do so by ``assignments``: "ste" or "soft", see ``finetune``). Every layer's
    settings are resolved and checked before any work starts, so a bad budget or a bad weight
    fails in a second, not after minutes of work.
    """
    jobs = [_job(name, module, spec) for name, module, spec in
            (plan or Plan()).resolve(model, {"method": method, "bits": bits, **options})]
    if not jobs:
        raise VQCError("the plan selects no layer to compress")
    _check_training(jobs, calibration, finetune_steps)
    check_assignments(assignments)
    teacher = copy.deepcopy(model).eval() if finetune_steps else None
    bar = tqdm(total=len(jobs), desc=f"{method}", unit="layer", disable=not progress)
    for run in shared_runs(jobs):
        codes = [code.to(run[0].module.weight.device) for code in fit_run(run, seed)]
        if run[0].settings.get("shared"):  # moved one by one, a shared codebook became copies: one tensor again
            for code in codes[1:]:
                code.codebook = codes[0].codebook
        for job, code in zip(run, codes):
            layer = coded_from_dense(job.module, code)
            if job.name:
                model.set_submodule(job.name, layer)
            else:  # the model is itself one layer
                model = layer
        bar.update(len(run))
    bar.close()
    if finetune_steps:
        finetune(model, teacher, calibration.task, calibration.batch_at, finetune_steps, lr=lr,
                 learn_assignments=any(job.method.learns_assignments for job in jobs), assignments=assignments,
                 checkpoint=checkpoint, progress=progress)
    return model


def _check_training(jobs: list[Job], calibration: TrainingData | None, finetune_steps: int) -> None:
    """Training data and fine-tuning steps come together, and methods that train need both."""
    trains = sorted({job.method.name for job in jobs if job.method.needs_training})
    if finetune_steps < 0:
        raise VQCError(f"finetune_steps must be ≥ 0, got {finetune_steps}")
    if trains and not (calibration and finetune_steps):
        raise VQCError(f"{', '.join(trains)} learns its codebooks in training: give training data and fine-tuning steps")
    if finetune_steps and calibration is None:
        raise VQCError("fine-tuning needs training data (calibration=TrainingData(task, batch_at))")
    if calibration is not None and not finetune_steps:
        raise VQCError("training data was given but no fine-tuning steps: the data-free methods do not use it")
