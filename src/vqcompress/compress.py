"""``compress``: plan → per-layer settings (all checked first) → fit → swap in coded layers."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import zlib
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import defaults, lattice
from .allocate import allocate, ceiling, check_budget, describe, has_levels, levels, sensitivities
from .budget import Budget, ModelAverage, PerLayer, resolve
from .calibrate import Blocks, InputStatistics, capturing, find_blocks, predicted_probabilities, predicting, statistics_pass
from .coded import CodedWeight
from .errors import VQCError
from .finetune import BLOCK_LR, Task, TrainingData, check_assignments, finetune, mean_loss, relative_error, tune_block
from .inputs import as_training_data
from .io import load, read_manifest, save
from .layers import coded_from_dense, iter_coded, rotates_rows
from .memory import release_free_memory, release_pages, released_after_use
from .methods import Method, MethodConfig, get_method, make_config
from .notes import say
from .plan import LeftDense, Plan
from .rotation import Rotation
from .source import source_of


@dataclass
class Checkpoint:
    """Where a run keeps its work so far (a .vqc file), and the identity of that run
    (``_run_identity``): only the same run resumes from it."""

    path: Path
    run: str

    def save(self, model: nn.Module) -> None:
        save(model, self.path, run=self.run)

    def resumable(self) -> bool:
        """Whether this run resumes from the file there: one another run wrote (other settings,
        model or data) is removed; said either way."""
        if not self.path.exists():
            return False
        try:
            manifest = read_manifest(self.path)[0]
        except VQCError:
            manifest = {}
        if manifest.get("run") != self.run:
            self.path.unlink()
            say(f"a checkpoint of another run (other settings, model or data) was at {self.path}: removed, starting over")
            return False
        say(f"resuming from the checkpoint {self.path}: {len(manifest['layers'])} layers already fitted")
        return True


def _run_identity(model: nn.Module, spec: dict, plan: Plan | None, budget: Budget | None, seed: int,
                  data: TrainingData | None, settings: dict) -> str:
    """A digest of everything a run's result depends on: the model's weights (its recorded sha256,
    else every tensor's sum), the method and its options, the plan, budget and seed, the
    calibration data (its first batch and its size) and the pipeline's other ``settings``."""
    digest = hashlib.sha256()
    source = source_of(model)
    if source.sha256:
        digest.update(source.sha256.encode())
    else:
        for name, tensor in model.state_dict().items():
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.double().sum().item()!r}".encode())
    digest.update(repr([spec, plan, budget, seed, settings]).encode())
    if data is not None:
        digest.update(f"{data.calibration_batches}|{None if data.token_counts is None else data.token_counts.sum()}".encode())
        for tensor in _tensors(data.batch_at(0)):
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _tensors(batch: object) -> list[Tensor]:
    """Every tensor in a batch (a tensor, or tuples, lists and dicts of them)."""
    if isinstance(batch, Tensor):
        return [batch]
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else []
    return [t for value in values for t in _tensors(value)]


#: Ridge added to every layer's input statistics, as a share of the mean input energy: inputs
#: that calibration barely excites keep part of their weight (inputs elsewhere may excite them).
DAMPING = 0.01


@dataclass
class Job:
    name: str
    module: nn.Module
    method: Method
    settings: dict
    config: MethodConfig  # what the user asked for (no method, no bits): the allocator's starting point
    kept: int = 0  # rows stored apart in int8 beside the codes (``keep_rows``): those of most weighted energy
    pinned_bits: float | None = None  # a budget the plan gave this layer by name or type: not allocated


def _job(name: str, module: nn.Module, spec: dict, budget: Budget | None) -> Job:
    """Resolve a layer's spec into concrete settings, refusing bad weights or budgets up front.
    ``budget`` is the model's; a ``bits`` in the layer's own spec pins the layer to it."""
    spec = dict(spec)
    method = get_method(spec.pop("method"))
    pinned, kept = spec.pop("bits", None), spec.pop("keep_rows", 0) or 0
    weight = module.weight.detach()
    if isinstance(kept, bool) or not isinstance(kept, int) or not 0 <= kept <= len(weight):
        raise VQCError(f"{name}: keep_rows must be a whole number of rows from 0 to {len(weight)}, got {kept!r}")
    if not torch.isfinite(weight.sum()) and not torch.isfinite(weight).all():  # one cheap sum first
        raise VQCError(f"{name}: the weight holds NaN or Inf values; fix the model before compressing it")
    release_pages([weight])  # the check read every page of a memory-mapped weight: not needed until its fit
    try:
        config = make_config(method, spec)
        pinned = None if pinned is None else PerLayer(pinned).bits
        settings = _start_settings(method, tuple(weight.shape), budget if pinned is None else PerLayer(pinned), config)
        method.layout(tuple(weight.shape), settings).validate()
    except VQCError as error:
        raise type(error)(f"{name}: {error}") from None  # the same kind: an ``Unfit`` layer is left dense (plan.py)
    return Job(name, module, method, settings, config, kept, pinned)


def _start_settings(method: Method, shape: tuple[int, ...], budget: Budget | None, config: MethodConfig) -> dict:
    """A layer's settings under a per-layer ``budget``; under a model average, those at the nearest
    level the method can take (the allocation then chooses each layer's own)."""
    if not isinstance(budget, ModelAverage):
        return method.settings(shape, None if budget is None else budget.bits, config)
    tries = sorted({budget.bits, *levels(budget.bits)}, key=lambda level: (level > budget.bits, abs(level - budget.bits)))
    errors = []
    for level in tries:
        try:
            return method.settings(shape, level, config)
        except VQCError as error:
            errors.append(error)
    raise errors[0]


def _layer_seed(seed: int, name: str) -> int:
    """A per-layer seed that depends on the layer's name, not on the order of the work."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**31


def _corrects_bias(job: Job) -> bool:
    """Whether the layer's bias absorbs its mean output error (``correct_bias``): where it has a
    bias and its method does not decline (``vq4all``, see there)."""
    return getattr(job.module, "bias", None) is not None and getattr(job.method, "corrects_bias", True)


def _fitting_statistics(job: Job, inputs: InputStatistics | None, kept: Tensor | None = None) -> InputStatistics | None:
    """What a layer is fitted to: its input statistics, damped by ``DAMPING``; centred when the
    layer's bias then absorbs the mean error; ``kept`` rows (stored apart) weighing nothing."""
    if inputs is None:
        return None
    if kept is not None:
        inputs = inputs.without_rows(kept)
    return (inputs.centred() if _corrects_bias(job) else inputs).damped(DAMPING)


def rotation_of(job: Job, seed: int, followers: list[Job] = ()) -> Rotation | None:
    """The layer's incoherence rotation (``rotation.py``) where its config asks for one: seeded by
    the layer's name; its outputs mixed too where the layer and every layer tied to it allow that
    (``layers.rotates_rows``)."""
    if job.config.transform in (None, "none"):
        return None
    weight = job.module.weight
    mix_rows = all(rotates_rows(layer.module) for layer in (job, *followers))
    return Rotation(len(weight), weight[0].numel(), _layer_seed(seed, job.name), mix_rows).to(weight.device)


def _stored_weight(job: Job, rotation: Rotation | None) -> Tensor:
    """The layer's weight (float32) in the basis its code holds it."""
    weight = job.module.weight.detach().float()
    return weight if rotation is None else rotation.to_stored(weight)


def _rotated(inputs: InputStatistics | None, rotation: Rotation | None) -> InputStatistics | None:
    """A layer's input statistics as its rotated weight sees them."""
    return inputs if inputs is None or rotation is None else inputs.transformed(rotation.inputs)


def fit_layer(job: Job, seed: int, inputs: InputStatistics | None = None, rotation: Rotation | None = None) -> CodedWeight:
    weight, inputs = _stored_weight(job, rotation), _rotated(inputs, rotation)
    kept = _rows_to_keep(job, weight, inputs)
    statistics = _fitting_statistics(job, inputs, kept)
    code = job.method.fit(weight, job.settings, _layer_seed(seed, job.name), statistics)
    return _finished(code, job, weight, statistics, kept)


def _rows_to_keep(job: Job, weight: Tensor, inputs: InputStatistics | None) -> Tensor | None:
    """With ``keep_rows``, the rows of ``weight`` an embedding stores apart in int8: those of largest
    weighted energy (its most used ones), chosen before the fit so that the codebook is fitted to
    the rows that will use it (Gemma's 16,384 most used token rows hold 95% of its row weight)."""
    if not job.kept:
        return None
    statistics = inputs or InputStatistics(row_weight=torch.ones(len(weight)))
    return statistics.heaviest_rows(weight.reshape(len(weight), -1), job.kept)


def _finished(code: CodedWeight, job: Job, weight: Tensor, statistics: InputStatistics | None,
              kept: Tensor | None) -> CodedWeight:
    """The method's coded weight with its recipe and, where the layer's input Gram matrix is known
    and its codes are plain, codes re-chosen with error feedback (``reassign_with_feedback``:
    the layer's output error is what the choices then reduce, as in GPTQ); then the ``kept``
    rows stored apart in int8 (an embedding's most used ones)."""
    code.recipe = {"method": job.method.name, **job.settings}
    weight = weight.to(code.codes.device)
    if (getattr(job.method, "feedback", True) and statistics is not None and statistics.gram is not None
            and code.layout.takes_feedback):
        code.reassign_with_feedback(weight, statistics.gram)
    if kept is not None:
        code.keep_rows(weight, kept)
    return code


def fit_run(run: list[Job], seed: int, statistics: dict[str, InputStatistics] | None = None,
            rotations: list[Rotation | None] | None = None) -> list[CodedWeight]:
    """The coded weights of a run of layers: one layer alone, or several sharing one codebook;
    each weighted by its layer's calibration ``statistics`` where there are some, each in the basis
    of its rotation where it has one."""
    statistics, rotations = statistics or {}, rotations or [None] * len(run)
    if len(run) == 1 and not run[0].settings.get("shared"):
        return [fit_layer(run[0], seed, statistics.get(run[0].name), rotations[0])]
    first = run[0]
    weights = [_stored_weight(job, rotation) for job, rotation in zip(run, rotations)]
    inputs = [_rotated(statistics.get(job.name), rotation) for job, rotation in zip(run, rotations)]
    kept = [_rows_to_keep(*args) for args in zip(run, weights, inputs)]
    fitting = [_fitting_statistics(*args) for args in zip(run, inputs, kept)]
    codes = first.method.fit_shared(weights, first.settings, _layer_seed(seed, first.name), fitting)
    return [_finished(*args) for args in zip(codes, run, weights, fitting, kept)]


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


@dataclass
class Summary:
    """What a run decided beside the codes, for its caller to say: what was left dense and why
    (``plan.LeftDense``) and, under a model average, the allocation's table."""
    left_dense: list[LeftDense] = field(default_factory=list)
    allocation: str | None = None


def compress(model: nn.Module, method: str | MethodConfig = "kmeans", bits: float | Budget | None = None,
             calibration: object = None, **options) -> nn.Module:
    """Replace the planned layers of ``model`` (in place) by coded layers; returns the model (a new
    object only when ``model`` is itself a single layer). The keywords are ``compress_with_summary``'s."""
    return compress_with_summary(model, method, bits, calibration, **options)[0]


def compress_with_summary(model: nn.Module, method: str | MethodConfig = "kmeans", bits: float | Budget | None = None,
                          calibration: object = None, *, plan: Plan | None = None, seed: int = 0,
                          progress: bool = True, finetune_steps: int | None = None, finetune_lr: float | None = None,
                          assignments: str | None = None, checkpoint: str | os.PathLike | None = None,
                          calibrate: bool | None = None, tune_dense: bool = True, tune_blocks: int | None = None,
                          block_lr: float = BLOCK_LR, task: Task | None = None,
                          **options) -> tuple[nn.Module, Summary]:
    """``compress``, and the run's ``Summary``.

    ``method`` is a method's name, its options then in ``options``, or its config object
    (``KMeansConfig(dim=4)``, with ``options`` over it); ``bits`` a budget (``budget.PerLayer``,
    ``budget.ModelAverage``) or a plain number (``budget.resolve``: the model's average when
    calibrated, each layer's ceiling otherwise).
    ``calibration`` is what the user has (``inputs.as_training_data``: example inputs, a data
    loader, text, or a ``TrainingData``); its task is inferred unless ``task`` is given.
    With ``calibration`` and ``calibrate`` (default: unless fine-tuning,
    which then uses the data as before), every layer is fitted to the statistics of its inputs on
    the first ``calibration.calibration_batches`` batches, block by block where the model has
    repeated blocks (see ``_fit_calibrated``); under a model average ``allocate`` gives each layer
    its share by measured sensitivity (by its weight error alone without data). With ``finetune_steps`` too,
    the compressed model is then distilled from a copy of the original by the shared fine-tuning
    engine at ``finetune_lr`` (default by the model's size, ``defaults.finetune_settings``): norms
    and biases too unless ``tune_dense=False``, and methods that learn assignments
    do so by ``assignments`` ("ste", "soft" or "progressive", see ``finetune``; by default the
    method's own way). With ``tune_blocks`` = N (calibrated, block by block), each block's coded
    weights (and, with ``tune_dense``, its norms and biases) are trained for N passes over the
    calibration batches at ``block_lr`` to give the uncompressed block's outputs (codes fixed).
    Every layer's settings are resolved and checked before any work starts, so
    a bad budget or a bad weight fails in a second, not after minutes of work.
    """
    calibration = as_training_data(calibration, model, task, seed, defaults.calibration_samples(model))
    spec = _global_spec(method, options)
    finetune_steps = _training_steps(model, spec, calibration, finetune_steps)
    calibrate = calibration is not None and (not finetune_steps or bool(tune_blocks) if calibrate is None else calibrate)
    budget = resolve(bits, calibrate)
    if budget is not None and progress:
        say(f"budget: {budget.describe()}")
    plan, tune_blocks = _with_defaults(model, plan or Plan(), spec, budget, calibrate, tune_blocks)
    # What the plan or a method leaves dense is listed, not refused (plan.Selection); a tensor
    # outside Linear / Conv / Embedding moves into a holder module (held.py) once its job stands.
    selection = plan.select(model, spec)
    jobs = selection.settle(lambda name, module, layer_spec: _job(name, module, layer_spec, budget))
    if not jobs:
        raise VQCError("the plan selects no layer to compress")
    jobs, followers = _untie(jobs)
    _check_training(jobs, calibration, finetune_steps, tune_blocks)
    _say_what_is_missing(jobs, budget, calibrate)
    assignments = assignments or getattr(jobs[0].method, "assignments", "ste")
    check_assignments(assignments)
    store = Checkpoint(Path(checkpoint), _run_identity(
        model, spec, plan, budget, seed, calibration if calibrate or finetune_steps else None,
        {"calibrate": calibrate, "tune_blocks": tune_blocks, "block_lr": block_lr, "tune_dense": tune_dense})
    ) if checkpoint else None
    teacher = copy.deepcopy(model).eval() if finetune_steps else None
    if tune_blocks and not calibrate:
        raise VQCError("tuning blocks works on the calibrated, block-by-block fit: leave calibrate on")
    if tune_blocks and (find_blocks(model) is None or any(job.settings.get("shared") for job in jobs)):
        raise VQCError("tuning blocks needs repeated blocks (transformer layers) and no shared codebooks: "
                       "use fine-tuning steps instead")
    # the budget checked now, not after the calibration passes
    available = check_budget(model, jobs, budget.bits) if isinstance(budget, ModelAverage) else None
    if available is not None:
        _say_if_unspent(model, jobs, budget, available)
    summary = Summary(selection.left_dense)
    if available is not None and any(has_levels(job) for job in jobs):
        predicted, summary.allocation = _allocate(model, jobs, calibration if calibrate else None, budget.bits,
                                                  available, seed, followers, progress)
    else:
        predicted = _predicted_rows(model, jobs, followers, calibration, progress) if calibrate else {}
    bar = tqdm(total=len(jobs), desc=spec["method"], unit="layer", disable=not progress)
    if not calibrate:
        model = _fit_runs(model, shared_runs(jobs), seed, bar, followers=followers)
    else:
        model = _fit_calibrated(model, jobs, calibration, seed, bar, store, followers, tune_blocks, block_lr,
                                tune_dense, predicted)
    bar.close()
    if finetune_steps:
        lr = finetune_lr or defaults.finetune_settings(teacher)[0]
        finetune(model, teacher, calibration.task, calibration.batch_at, finetune_steps, lr=lr,
                 learn_assignments=_learns_assignments(model, jobs, progress), assignments=assignments,
                 checkpoint=store and store.path.with_name(store.path.name + ".finetune"), progress=progress,
                 tune_dense=tune_dense, run=store.run if store else "")
    if store is not None and store.path.exists():
        store.path.unlink()
    return model, summary


def _learns_assignments(model: nn.Module, jobs: list[Job], progress: bool) -> bool:
    """Whether fine-tuning moves sub-vectors to other codewords: where a method learns them, and no
    coded weight points at a codebook searched by its structure (a lattice's candidates would need
    a scan of its 2^16 points per sub-vector) or is trellis-coded (a code is a whole row's path); said when that keeps the codes fixed."""
    if not any(job.method.learns_assignments for job in jobs):
        return False
    structured = any(layer.weight_code.layout.codebook_sha256 in lattice.STRUCTURED or layer.weight_code.layout.trellis
                     for _, layer in iter_coded(model))
    if structured and progress:
        say("a lattice's or trellis's codes stay as fitted while fine-tuning (their candidates would need a scan of "
            "every point); scales, norms and biases train")
    return not structured


def _training_steps(model: nn.Module, spec: dict, data: TrainingData | None, steps: int | None) -> int:
    """The fine-tuning steps: as given; for a method that learns in training, given data but no
    steps, the structure's default (``defaults.training_steps``), said."""
    if steps is not None:
        return steps
    if data is None or not get_method(spec["method"]).needs_training:
        return 0
    steps = defaults.training_steps(model)
    say(f"{spec['method']} learns its codebooks in training: {steps} steps (finetune_steps / --finetune-steps)")
    return steps


def _with_defaults(model: nn.Module, plan: Plan, spec: dict, budget: Budget | None, calibrate: bool,
                   tune_blocks: int | None) -> tuple[Plan, int]:
    """The plan and block tuning with what the model's structure chooses where the user chose
    nothing (``defaults.choose``), each choice said."""
    if spec.get("shared"):  # codebooks shared across blocks: no block is fitted on its own
        return plan, tune_blocks or 0
    choices = defaults.choose(model, plan, budget, calibrate, tune_blocks)
    for sentence in choices.said:
        say(sentence)
    return replace(plan, by_name={**choices.by_name, **plan.by_name}), choices.tune_blocks


def _say_what_is_missing(jobs: list[Job], budget: Budget | None, calibrate: bool) -> None:
    """Say where the run is not what the user might think: a method made for calibration data run
    without it, a per-layer budget above what the method codes."""
    methods = sorted({job.method.name for job in jobs if getattr(job.method, "calibrates", False)})
    if methods and not calibrate:
        say(f"{', '.join(methods)} fits each layer to its calibration inputs, but none were given: each layer is "
            "fitted to its weights alone (give calibration data for the output-error fit)")
    if isinstance(budget, PerLayer):
        layouts = [job.method.layout(tuple(job.module.weight.shape), job.settings) for job in jobs]
        most = max(sum(width * count for width, count in lay.row_streams().values()) / lay.cols for lay in layouts)
        if budget.bits > most + 0.5:
            say(f"--bits {budget.bits:g} is more than {', '.join(sorted({job.method.name for job in jobs}))} codes "
                f"here: at most {most:g} index bits per weight (capped there)")


def _say_if_unspent(model: nn.Module, jobs: list[Job], budget: ModelAverage, available: float) -> None:
    """Say where a model average is more than the methods can spend (a universal codebook has one
    cost, say): the file then stays well under the budget."""
    most = ceiling(model, jobs, budget.bits, available)
    if most < 0.9 * budget.bits:
        say(f"the budget of {budget.bits:g} bits per weight is more than {', '.join(sorted({job.method.name for job in jobs}))} "
            f"codes here: about {most:.2f} bits per weight at most (capped there)")


def _global_spec(method: str | MethodConfig, options: dict) -> dict:
    """The plan's global spec: the method's name and its options, checked once here (an unknown or
    ill-typed option fails before any layer is looked at)."""
    if isinstance(method, MethodConfig):
        method, options = method.method, method.given() | options
    if not isinstance(method, str):
        raise VQCError(f"method must be a method's name or its config, got {method!r}")
    make_config(get_method(method), options)
    return {"method": method, **options}


def _allocate(model: nn.Module, jobs: list[Job], data: TrainingData | None, bits: float, available: float,
              seed: int, followers: dict[str, list[Job]], progress: bool = False) -> tuple[dict[str, Tensor], str]:
    """Give each job the settings of its share of the model's bit budget (``allocate``), measured
    on the statistics of one pass of the uncompressed model (without data: each layer's relative
    weight error, every layer alike). Returns the tied tables' predicted token probabilities, which
    the same pass measures (``_predicted_rows``), and the allocation's table (``allocate.describe``)."""
    statistics, gains, predicted = _sensitivities(model, jobs, data, seed, followers, progress) if data is not None else ({}, None, {})
    chosen = allocate(jobs, statistics, bits, available, seed, gains, progress)
    release_pages(job.module.weight for job in jobs)  # the passes read every weight
    for job, option in zip(jobs, chosen):
        job.settings = option.settings
    return predicted, describe(jobs, chosen)


def _sensitivities(model: nn.Module, jobs: list[Job], data: TrainingData, seed: int, followers: dict[str, list[Job]],
                   progress: bool = False) -> tuple[dict[str, InputStatistics | None], list[float], dict[str, Tensor]]:
    """Each job's fitting statistics from one pass of the uncompressed model, which also measures
    the tied tables' predicted tokens (``_predicted_rows``), and its sensitivity (the model's
    output loss per unit of the layer's relative output error)."""
    head, tied = _tied_head(model, jobs, followers)
    with capturing({job.name: job.module for job in jobs}) as collected, \
            (predicting(head) if tied else nullcontext(lambda: None)) as mean:
        for i in tqdm(range(data.calibration_batches), desc="input statistics", unit="batch", disable=not progress,
                      leave=False):
            batch = data.batch_at(i)
            statistics_pass(model, data.task.forward, batch, data.task.positions(batch), _uncollected_head(model, jobs))
        predicted = dict.fromkeys(tied, mean())
        statistics = _embedding_statistics(collected(), jobs, data, predicted)
    statistics = {job.name: _fitting_statistics(job, statistics.get(job.name)) for job in jobs}
    probe = [data.task.probe(data.batch_at(0))]
    with torch.no_grad():
        targets = [data.task.forward(model, batch) for batch in probe]

    def loss() -> float:
        return mean_loss(data.task, model, probe, targets)

    return statistics, sensitivities(jobs, statistics, loss, seed, progress), predicted


def _embedding_statistics(statistics: dict[str, InputStatistics], jobs: list[Job], data: TrainingData,
                          predicted: dict[str, Tensor]) -> dict[str, InputStatistics]:
    """Embeddings' row weights: how often each token occurs in all the calibration text
    (``TrainingData.token_counts``) where the data gives that, far more of the vocabulary than
    the calibration batches look up, for the price of tokenizing; for a table tied to the output
    head, half that and half the probability the model gives each token (``_predicted_rows``)."""
    for job in jobs:
        if not isinstance(job.module, nn.Embedding):
            continue
        weight = statistics[job.name].row_weight if job.name in statistics else None
        if data.token_counts is not None:
            counts = data.token_counts.float()[:job.module.num_embeddings]
            counts = torch.cat([counts, counts.new_zeros(job.module.num_embeddings - len(counts))])
            weight = counts / counts.sum().clamp_min(1)
        if weight is not None and job.name in predicted:
            weight = (weight + predicted[job.name].to(weight)) / 2
        if weight is not None:
            statistics[job.name] = InputStatistics(row_weight=weight.to(job.module.weight.device))
    return statistics


def _tied_head(model: nn.Module, jobs: list[Job], followers: dict[str, list[Job]]) -> tuple[nn.Module | None, list[str]]:
    """The model's output head and the embeddings whose table it shares (a tied language model)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = [job.name for job in jobs if isinstance(job.module, nn.Embedding)
            and any(follower.module is head for follower in followers.get(job.name, []))]
    return (head, tied) if head is not None and tied else (None, [])


def _predicted_rows(model: nn.Module, jobs: list[Job], followers: dict[str, list[Job]],
                    data: TrainingData, progress: bool = False) -> dict[str, Tensor]:
    """For an embedding whose table is also the model's output head (a tied language model), by
    name: the mean probability the uncompressed model gives each token on the calibration batches.
    A row's error lands twice, where its token is looked up and in its logit at every position;
    there, noise in the logits of tokens the model finds likely costs most, and those include
    tokens the calibration text never uses (on Gemma: 2.7% of the predicted probability). Its own
    pass where no allocation runs one (``_sensitivities``), and none where no tied table's fit or
    kept rows would read the weights (a fixed grid: ``weighs_inputs``)."""
    head, tied = _tied_head(model, jobs, followers)
    weighed = {job.name for job in jobs if job.kept or getattr(job.method, "weighs_inputs", True)}
    tied = [name for name in tied if name in weighed]
    if not tied:
        return {}
    batches = tqdm((data.batch_at(i) for i in range(data.calibration_batches)), total=data.calibration_batches,
                   desc="predicted tokens", unit="batch", disable=not progress, leave=False)
    found = find_blocks(model)
    with released_after_use(found[1] if found else []):
        probabilities = predicted_probabilities(model, head, data.task.forward, batches, data.task.positions)
    release_pages(job.module.weight for job in jobs)  # the passes read every weight
    return dict.fromkeys(tied, probabilities)


def _uncollected_head(model: nn.Module, jobs: list[Job]) -> nn.Module | None:
    """The model's output layer (``get_output_embeddings``) where no job collects its inputs: a
    statistics pass can stop before it."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return None if head is None or any(job.module is head for job in jobs) else head


def _untie(jobs: list[Job]) -> tuple[list[Job], dict[str, list[Job]]]:
    """Jobs whose layer holds the same weight tensor as an earlier one (a tied word embedding and
    output layer) follow that one: fitted once, one coded weight for both, stored once.
    Returns the jobs to fit and, by name, the followers of each."""
    first: dict[int, Job] = {}
    followers: dict[str, list[Job]] = {}
    for job in jobs:
        leader = first.setdefault(id(job.module.weight), job)
        if leader is not job:
            followers.setdefault(leader.name, []).append(job)
    return [job for job in jobs if first[id(job.module.weight)] is job], followers


def _fit_runs(model: nn.Module, runs: list[list[Job]], seed: int, bar: tqdm,
              statistics: dict[str, InputStatistics] | None = None,
              followers: dict[str, list[Job]] | None = None) -> nn.Module:
    """Fit each run of layers and swap the coded layers into ``model`` (each job's followers get
    the very same coded weight); each job then points at its coded layer, so that a dense weight
    (Gemma's embedding: 671 MB) is freed when its layer is done, not when the whole model is."""
    for run in runs:
        rotations = [rotation_of(job, seed, (followers or {}).get(job.name, [])) for job in run]
        codes = [code.to(run[0].module.weight.device) for code in fit_run(run, seed, statistics, rotations)]
        if run[0].settings.get("shared"):  # moved one by one, a shared codebook became copies: one tensor again
            for code in codes[1:]:
                code.codebook = codes[0].codebook
        for job, code, rotation in zip(run, codes, rotations):
            layer = coded_from_dense(job.module, code, rotation)
            if _corrects_bias(job):
                correct_bias(layer, job.module.weight, (statistics or {}).get(job.name))
            if job.name:
                model.set_submodule(job.name, layer)
            else:  # the model is itself one layer
                model = layer
            for follower in (followers or {}).get(job.name, []):
                follower.module = coded_from_dense(follower.module, code, rotation)
                model.set_submodule(follower.name, follower.module)
            release_pages([job.module.weight])  # never read again: a memory-mapped weight's pages go too
            job.module = layer  # the job no longer holds the dense weight: freed as soon as it is coded
        bar.update(len(run))
    return model


def correct_bias(layer: nn.Module, weight: torch.Tensor, inputs: InputStatistics | None) -> None:
    """Add the mean output error (W − Ŵ) μ to the layer's bias (bias correction): on the
    calibration inputs the coded layer's mean output is then the original's."""
    if inputs is None or inputs.mean is None or getattr(layer, "bias", None) is None:
        return
    with torch.no_grad():
        difference = weight.detach().float().reshape(len(layer.bias), -1) - layer.weight.reshape(len(layer.bias), -1)
        layer.bias += (difference @ inputs.mean).to(layer.bias.dtype)


def _fit_calibrated(model: nn.Module, jobs: list[Job], data: TrainingData, seed: int, bar: tqdm,
                    checkpoint: Checkpoint | None = None, followers: dict[str, list[Job]] | None = None,
                    tune_blocks: int = 0, block_lr: float = BLOCK_LR, tune_dense: bool = True,
                    predicted: dict[str, Tensor] | None = None) -> nn.Module:
    """Fit every layer on the statistics of its inputs. A model with repeated blocks is done block
    by block: layers before the blocks first, then each block on inputs that went through the
    blocks already compressed (one block's activations in memory), then the layers after them.
    With ``tune_blocks`` (passes over the calibration batches), each block's coded weights are
    then trained to give the uncompressed block's outputs on the uncompressed model's inputs
    (``tune_block``), which also repairs the error of the blocks before it.
    With ``checkpoint``, the model so far is saved there (a .vqc file) after every stage, and the
    same run finding the file starts from it: the layers it holds are not fitted again, and the
    result is the same file as an uninterrupted run's."""
    batches = [data.batch_at(i) for i in range(data.calibration_batches)]
    found = find_blocks(model) if all(job.name for job in jobs) else None
    blockwise = found is not None and not any(job.settings.get("shared") for job in jobs)
    tuning, resuming = blockwise and bool(tune_blocks), checkpoint is not None and checkpoint.resumable()
    # The teacher's block is the block itself until its stage codes it; copies only where the
    # checkpoint is about to replace blocks (a copy of every block is the dense model over again).
    originals = list(copy.deepcopy(found[1])) if tuning and resuming else None
    teacher_inputs = Blocks(model, found[1], data.task.forward, batches).first_inputs() if tuning else None
    done: set[str] = set()
    if resuming:
        model = load(checkpoint.path, like=model, device=str(next(model.parameters()).device))
        done = {name for name, _ in iter_coded(model)}
        bar.update(len(done))

    def fit_stage(stage: list[Job], run: Callable[[], object], keep: bool = True) -> nn.Module:
        """Fit the stage's layers not done yet; with ``keep``, checkpoint the model after them."""
        stage = [job for job in stage if job.name not in done]
        if not stage:
            return model
        with capturing({job.name: job.module for job in stage}) as collected, torch.no_grad():
            run()
            statistics = _embedding_statistics(collected(), stage, data, predicted or {})
        fitted = _fit_runs(model, shared_runs(stage), seed, bar, statistics, followers)
        release_free_memory()  # the stage's activations and fitting temporaries
        if checkpoint is not None and keep:
            checkpoint.save(fitted)
        return fitted

    def run_model() -> None:
        for batch in batches:
            statistics_pass(model, data.task.forward, batch, data.task.positions(batch), _uncollected_head(model, jobs))

    if not blockwise:
        return fit_stage(jobs, run_model)
    before, per_block, after = _stages(model, jobs, found[0], len(found[1]))
    blocks = Blocks(model, found[1], data.task.forward, batches, data.task.positions)
    model = fit_stage(before, blocks.first_inputs)
    inputs = blocks.first_inputs()  # the first block sees what the compressed layers before it give
    for index, stage in enumerate(per_block):
        fresh = any(job.name not in done for job in stage)
        if tuning:
            targets = blocks.run(index, teacher_inputs, originals[index] if originals else None)
            if originals:
                originals[index] = None  # one uncompressed block less in memory
        model = fit_stage(stage, lambda: blocks.run(index, inputs), keep=not tuning)  # kept once tuned
        outputs = blocks.run(index, inputs)
        if tuning:
            if fresh and any(iter_coded(blocks.blocks[index])):
                outputs = _tuned(blocks, index, inputs, outputs, targets, tune_blocks, block_lr, tune_dense, bar)
                if checkpoint is not None:
                    checkpoint.save(model)
            teacher_inputs = targets
        inputs = outputs
    return fit_stage(after, run_model)


def _tuned(blocks: Blocks, index: int, inputs: list[torch.Tensor], outputs: list[torch.Tensor],
           targets: list[torch.Tensor], epochs: int, lr: float, tune_dense: bool, bar: tqdm) -> list[torch.Tensor]:
    """Tune block ``index`` towards ``targets`` (``tune_block``) and return its new outputs; a
    tuning that leaves the output error on the calibration data higher is undone (a few Adam
    steps move every parameter by about the step size, which can cost a block that was already
    close more than it gains). Says how far the error fell."""
    block = blocks.blocks[index]
    before, kept = relative_error(outputs, targets, blocks.positions), copy.deepcopy(block.state_dict())
    tune_block(blocks, index, inputs, targets, epochs, lr=lr, tune_dense=tune_dense)
    tuned = blocks.run(index, inputs)
    after = relative_error(tuned, targets, blocks.positions)
    if after > before:
        block.load_state_dict(kept)
    if not bar.disable:
        bar.write(f"block {index}: output error {before:.4f} → {after:.4f}" + (" (undone)" if after > before else ""),
                  file=sys.stderr)  # beside the bars: stdout is the result's (``vqc compress --json``)
    return tuned if after <= before else outputs


def _stages(model: nn.Module, jobs: list[Job], prefix: str, count: int) -> tuple[list[Job], list[list[Job]], list[Job]]:
    """Jobs before the blocks, in each block, and after them (model order)."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    first = order[f"{prefix}.0"]
    per_block: list[list[Job]] = [[] for _ in range(count)]
    before, after = [], []
    for job in jobs:
        if job.name.startswith(prefix + "."):
            per_block[int(job.name[len(prefix) + 1:].split(".")[0])].append(job)
        else:
            (before if order[job.name] < first else after).append(job)
    return before, per_block, after


def _check_training(jobs: list[Job], calibration: TrainingData | None, finetune_steps: int, tune_blocks: int = 0) -> None:
    """Methods that train need training data and fine-tuning steps; fine-tuning needs data."""
    trains = sorted({job.method.name for job in jobs if job.method.needs_training})
    if finetune_steps < 0:
        raise VQCError(f"finetune_steps must be ≥ 0, got {finetune_steps}")
    if tune_blocks < 0:
        raise VQCError(f"tune_blocks must be ≥ 0, got {tune_blocks}")
    if tune_blocks and calibration is None:
        raise VQCError("tuning blocks needs calibration data (calibration=[example inputs …])")
    if trains and not (calibration and finetune_steps):
        raise VQCError(f"{', '.join(trains)} learns its codebooks in training: give training data and fine-tuning steps")
    if finetune_steps and calibration is None:
        raise VQCError("fine-tuning needs training data (calibration=[example inputs …])")
