"""``compress``: plan → per-layer settings (all checked first) → fit → swap in coded layers."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .coded import CodedWeight
from .errors import VQCError
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


def compress(model: nn.Module, method: str = "kmeans", bits: float | None = None, calibration=None, *,
             plan: Plan | None = None, seed: int = 0, progress: bool = True, **options) -> nn.Module:
    """Replace the planned layers of ``model`` (in place) by coded layers; returns the model
    (a new object only when ``model`` is itself a single layer).

    Every layer's settings are resolved and checked before any fitting starts, so a bad budget
    or a bad weight fails in a second, not after minutes of work.
    """
    if calibration is not None:
        raise VQCError(f"{method} is data-free and does not use calibration data")
    jobs = [_job(name, module, spec) for name, module, spec in
            (plan or Plan()).resolve(model, {"method": method, "bits": bits, **options})]
    if not jobs:
        raise VQCError("the plan selects no layer to compress")
    for job in tqdm(jobs, desc=f"{method}", unit="layer", disable=not progress):
        layer = coded_from_dense(job.module, fit_layer(job, seed)).to(job.module.weight.device)
        if job.name:
            model.set_submodule(job.name, layer)
        else:  # the model is itself one layer
            model = layer
    return model
