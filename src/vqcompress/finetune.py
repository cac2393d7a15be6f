"""The shared fine-tuning engine: distil a compressed student from its uncompressed teacher.

What trains: every codebook, scale and offset of the coded layers (a codeword receives the
summed gradient of the sub-vectors that use it), and every other parameter the student still
has (norms, biases, small dense layers). With ``learn_assignments`` the assignments learn too,
the way ``assignments`` names (``ASSIGNMENTS``: straight-through, soft or progressive, each a
strategy of ``assign`` that wraps the coded weights for the run), until 80% of the steps; the
last 20% tune the codebooks to that fixed assignment.

Batches come from ``batch_at(step)``, a pure function of the step, so an interrupted run resumed
from its checkpoint sees the same data and ends with the same weights as an uninterrupted one.
The student runs in eval mode (no dropout, frozen BatchNorm statistics) for the same reason.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from .assign import Fixed, Soft, StraightThrough
from .atomic import write_tensors
from .calibrate import spans_positions
from .errors import VQCError
from .layers import iter_coded
from .progressive import LOGIT_LR, Progressive

GUARD_BATCHES = 4  # batches a fine-tuning run is judged on before and after (undone if worse)
#: the ways assignments learn (``assign``)
ASSIGNMENTS = {"ste": StraightThrough, "soft": Soft, "progressive": Progressive}
#: Causal LMs: tokens of the batch the allocation probes each layer's sensitivity on.
PROBE_TOKENS = 256
#: positions whose next-token KL is computed at once: its temporaries are a few vocabulary-sized rows
#: each, so a large vocabulary's loss stays small next to the model (docs/methods.md, jlcm: memory)
LOSS_ROWS = 32
#: Block tuning: Adam's step size (codebooks and scales are O(1) numbers after row scaling).
BLOCK_LR = 1e-3


@dataclass
class Task:
    """How to run a model on a batch, and how far a student's output is from its teacher's."""

    forward: Callable[[nn.Module, Any], Tensor]
    loss: Callable[[Tensor, Tensor, Any], Tensor]
    #: the (batch, sequence) positions of a batch that are real inputs (not padding), for
    #: calibration statistics; None: all of them
    positions: Callable[[Any], Tensor | None] = lambda batch: None
    #: the part of a batch that the allocation's sensitivities are measured on (a forward pass
    #: per layer): the whole batch unless that is costly
    probe: Callable[[Any], Any] = lambda batch: batch


@dataclass
class TrainingData:
    """What fine-tuning needs from the user: a task and the batch for every step."""

    task: Task
    batch_at: Callable[[int], Any]
    calibration_batches: int = 8  # the first batches, which calibration statistics are taken on
    token_counts: Tensor | None = None  # how often each token id occurs in all the calibration text


def classification_task(temperature: float = 2.0, label_weight: float = 0.5) -> Task:
    """Batches are (inputs, labels or None): KL to the teacher's softened logits plus cross-entropy."""

    def loss(student: Tensor, teacher: Tensor, batch: Any) -> Tensor:
        distil = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                          reduction="batchmean", log_target=True) * temperature**2
        labels = batch[1]
        return distil if labels is None else (1 - label_weight) * distil + label_weight * F.cross_entropy(student, labels)

    return Task(forward=lambda model, batch: model(batch[0]), loss=loss)


def encoder_task() -> Task:
    """Batches are tokenizer outputs: match the teacher's token states and its pooled embedding."""

    def forward(model: nn.Module, batch: dict) -> Tensor:
        return model(**batch).last_hidden_state

    def loss(student: Tensor, teacher: Tensor, batch: dict) -> Tensor:
        mask = batch["attention_mask"].unsqueeze(-1).to(student.dtype)
        token_error = ((student - teacher) ** 2 * mask).sum() / (mask.sum() * student.shape[-1])
        pooled = [(x * mask).sum(1) / mask.sum(1) for x in (student, teacher)]
        return token_error / teacher.pow(2).mean() + (1 - F.cosine_similarity(*pooled, dim=-1)).mean()

    return Task(forward=forward, loss=loss, positions=lambda batch: batch["attention_mask"])


def _kl_sum(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    return F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                    reduction="sum", log_target=True)


def causal_lm_task(temperature: float = 1.0) -> Task:
    """Batches are {"input_ids": …}: KL divergence of the student's next-token distributions from
    the teacher's, over every position."""

    def forward(model: nn.Module, batch: dict) -> Tensor:
        return model(**batch, use_cache=False).logits  # no key/value cache: blocks are rerun on captured inputs

    def loss(student: Tensor, teacher: Tensor, batch: dict) -> Tensor:
        """The mean over positions, a slice of positions at a time, each recomputed in the backward
        pass: the log-probabilities of a whole batch would be held otherwise (Gemma: 262,144 logits
        a position, 2 GiB a tensor for 4 windows)."""
        vocab = student.shape[-1]
        students, teachers = student.reshape(-1, vocab).split(LOSS_ROWS), teacher.reshape(-1, vocab).split(LOSS_ROWS)
        total = sum(torch.utils.checkpoint.checkpoint(_kl_sum, s, t, temperature, use_reentrant=False)
                    for s, t in zip(students, teachers))
        return total / (student.numel() // vocab) * temperature**2

    def probe(batch: dict) -> dict:
        """The first PROBE_TOKENS tokens of the first window: an LM with a large vocabulary pays
        for every position's logits, once per layer probed."""
        return {key: value[:1, :PROBE_TOKENS] for key, value in batch.items()}

    return Task(forward=forward, loss=loss, probe=probe)


def _learning_rate(base: float, step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero: a pure function of the step, so resume is exact."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _save_checkpoint(path: Path, step: int, student: nn.Module, optimizer: torch.optim.Optimizer, run: str) -> None:
    """Student state and optimizer moments as one safetensors file, written atomically (no pickle),
    with the ``run`` it belongs to (see ``_load_checkpoint``)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        tensors.update({f"optimizer.{index}.{k}": torch.as_tensor(v).cpu().contiguous() for k, v in state.items()})
    write_tensors(path, tensors, {"step": str(step), "run": run})


def _load_checkpoint(path: Path, student: nn.Module, optimizer: torch.optim.Optimizer, run: str) -> int:
    """Restore a checkpoint written by ``_save_checkpoint``; returns the step to continue from.
    One written by another ``run`` (other settings, model or data) is removed and the run starts
    over; either way it is said."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        step = int(metadata["step"])
        if metadata.get("run") != run:
            path.unlink()
            tqdm.write(f"a fine-tuning checkpoint of other settings was at {path}: removed, starting over",
                       file=sys.stderr)
            return 0
        tensors = load_file(str(path))
    except Exception as error:  # any unreadable checkpoint is the same user-facing problem
        raise VQCError(f"cannot resume from {path} ({error}): delete it to start over") from None
    tqdm.write(f"resuming fine-tuning from {path} at step {step}", file=sys.stderr)
    student.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return step


@contextmanager
def _deterministic_algorithms():
    """Same seed, same weights: CPU convolution gradients otherwise vary from run to run.
    (``warn_only``: on CUDA an op with no deterministic kernel warns rather than stops.)"""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _original_weight(teacher: nn.Module, name: str, layer: nn.Module) -> Tensor:
    """The teacher's dense weight of a coded layer: where its latent weight starts. A teacher
    that is itself coded there (or lacks the layer) gives the decoded weight instead."""
    try:
        original = getattr(teacher.get_submodule(name), "weight", None)
    except AttributeError:
        original = None
    if isinstance(original, Tensor) and tuple(original.shape) == layer.weight_code.layout.shape:
        return layer.stored(original.detach())
    return layer.weight_code.decode().detach()


def check_assignments(assignments: str) -> None:
    """Refuse an unknown way of learning assignments before any work starts."""
    if assignments not in ASSIGNMENTS:
        raise VQCError(f"assignments must be one of {', '.join(ASSIGNMENTS)}, got {assignments!r}")


def _optimizer(student: nn.Module, lr: float, logits: list[nn.Parameter]) -> torch.optim.Adam:
    """Adam over every trainable parameter at ``lr``; candidate ``logits`` at their own step size."""
    apart = {id(p) for p in logits}
    groups = [{"params": [p for p in student.parameters() if p.requires_grad and id(p) not in apart], "base_lr": lr}]
    if logits:
        groups.append({"params": logits, "base_lr": LOGIT_LR})
    return torch.optim.Adam([{**g, "lr": g["base_lr"]} for g in groups])


def finetune(student: nn.Module, teacher: nn.Module, task: Task, batch_at: Callable[[int], Any], steps: int, *,
             lr: float = 1e-3, learn_assignments: bool = False, assignments: str = "ste", reassign_every: int = 25,
             checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 100,
             progress: bool = True, tune_dense: bool = True, run: str = "") -> nn.Module:
    """Distil ``student`` (with coded layers) from ``teacher`` for ``steps`` steps; returns the student.
    ``tune_dense=False`` keeps everything outside the coded weights (norms, biases, layers left
    dense) as it is, so only codebooks, scales and assignments learn.

    With ``checkpoint``, progress is saved there every ``checkpoint_every`` steps and a run that
    finds the file resumes from it when it was written by the same ``run`` (an identity of the
    model, data and settings; the steps, rate and assignments are added to it here); the file is
    removed once training completes.

    A run that ends with a higher loss on its first ``GUARD_BATCHES`` batches than the student had
    before it is undone, and says so: too large a step can leave a model worse than it began
    (MiniLM's learned assignments at lr 10⁻³), and a worse file is never what was asked for.
    """
    coded = list(iter_coded(student))
    if not coded:
        raise VQCError("the model has no coded layer to fine-tune: compress it first")
    if steps < 1:
        raise VQCError(f"fine-tuning needs at least one step, got {steps}")
    check_assignments(assignments)
    guard = [batch_at(i) for i in range(min(steps, GUARD_BATCHES))]

    def targets() -> Iterable[Tensor]:  # recomputed each time rather than held: see mean_loss
        return (task.forward(teacher, batch) for batch in guard)

    before, initial = mean_loss(task, student, guard, targets()), copy.deepcopy(student.state_dict())
    first: dict[int, tuple[str, nn.Module]] = {}  # layers tied to one coded weight: the first of them
    for name, layer in coded:
        first.setdefault(id(layer.weight_code), (name, layer))
    codes = {name: layer.weight_code for name, layer in first.values()}
    shared: dict[int, tuple] = {}  # a codebook held by several layers trains as one parameter
    for code in codes.values():
        code.start_training(shared)
    if learn_assignments:
        originals = {name: _original_weight(teacher, name, layer) for name, layer in first.values()}
        ways = {**ASSIGNMENTS, "ste": partial(StraightThrough, reassign_every=reassign_every)}
        learning = ways[assignments](codes, originals)
    else:
        learning = Fixed(codes)
    teacher.eval()
    student.eval().requires_grad_(tune_dense)
    for code in codes.values():
        code.requires_grad_(True)
    optimizer = _optimizer(student, lr, learning.logits())
    checkpoint = Path(checkpoint) if checkpoint else None
    run = f"{run}|{steps}|{lr}|{learn_assignments}|{assignments}|{reassign_every}|{tune_dense}"
    start = _load_checkpoint(checkpoint, student, optimizer, run) if checkpoint and checkpoint.exists() else 0
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="fine-tune", unit="step", disable=not progress)
    with _deterministic_algorithms():
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(group["base_lr"], step, steps, warmup=max(1, steps // 20))
            learning.before_step(step, steps)
            batch = batch_at(step)
            with torch.no_grad():
                target = task.forward(teacher, batch)
            loss = task.loss(task.forward(student, batch), target, batch)
            loss = loss + learning.penalty(step, steps)
            if not torch.isfinite(loss):  # a diverged run would write NaN weights
                raise VQCError(f"fine-tuning diverged at step {step + 1} (the loss is {loss.item()}): lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            shown = learning.after_step(step, steps, lambda: mean_loss(task, student, guard, targets()), progress)
            bar.set_postfix(loss=f"{loss.item():.4f}", **shown)
            if checkpoint and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                _save_checkpoint(checkpoint, step + 1, student, optimizer, run)
    learning.finish()
    finished: dict[int, tuple] = {}  # the shared codebook parameter back to one stored tensor
    for code in codes.values():
        code.finish_training(finished)
    after = mean_loss(task, student, guard, targets())
    if not after <= before:  # said even when quiet: it is no progress bar but what the file holds
        student.load_state_dict(initial)
        tqdm.write(f"fine-tuning raised the loss on its first batches ({before:.4f} → {after:.4f}): undone; "
                   "a smaller learning rate may help", file=sys.stderr)
    if checkpoint and checkpoint.exists():
        checkpoint.unlink()
    return student


def mean_loss(task: Task, model: nn.Module, batches: list, targets: Iterable[Tensor]) -> float:
    """The distillation loss of ``model`` against ``targets`` (the teacher's outputs, one per
    batch: a generator computes each only when needed, as a language model's logits are large),
    averaged over ``batches``, without gradients."""
    with torch.no_grad():
        return sum(float(task.loss(task.forward(model, b), t, b)) for b, t in zip(batches, targets)) / len(batches)


def _positions_weight(positions: Tensor | None, output: Tensor) -> Tensor | float:
    """1 where an output position is a real input (not padding), broadcastable to ``output``."""
    if not spans_positions(output, positions):
        return 1.0
    return positions.to(output.dtype).reshape(*positions.shape, *[1] * (output.dim() - positions.dim()))


def channel_weights(targets: list[Tensor], positions: list[Tensor | None]) -> Tensor:
    """1 / each output channel's mean square over the real positions of every batch. A block's
    error counts channel by channel, each relative to its own energy: a decoder's residual stream
    holds most of its energy in one or a few channels (Gemma-270M: 47–94% in one after every
    block but the last), which a plain squared error would tune for alone, while the next block's
    norm divides them out. Measured on Gemma-270M's qswd 3.0 file, its fitted blocks tuned
    afterwards (two passes, the same step size): plain squared error took the perplexity from
    58.75 to 74.15, this from 58.75 to 51.15."""
    energy = count = 0.0
    for target, where in zip(targets, positions):
        weight = _positions_weight(where, target)
        energy = energy + (target.detach().float().square() * weight).reshape(-1, target.shape[-1]).sum(0)
        count += float((torch.ones_like(target[..., :1]) * weight).sum())
    mean_square = energy / count
    return 1 / mean_square.clamp_min(float(mean_square.mean()) * 1e-6 + torch.finfo(mean_square.dtype).tiny)


def relative_error(outputs: list[Tensor], targets: list[Tensor], positions: list[Tensor | None]) -> float:
    """Each output channel's ‖output − target‖² / ‖target‖², averaged over the channels, over
    every batch, padding left out (``channel_weights``)."""
    weights = channel_weights(targets, positions)
    error = energy = 0.0
    for output, target, where in zip(outputs, targets, positions):
        weight = _positions_weight(where, target) * weights
        error += float(((output - target).square() * weight).sum())
        energy += float((target.square() * weight).sum())
    return error / energy


def tune_block(blocks: Any, index: int, inputs: list[Tensor], targets: list[Tensor], epochs: int, *,
               lr: float = BLOCK_LR, tune_dense: bool = True) -> None:
    """Train the coded weights of block ``index`` of ``blocks`` (a ``calibrate.Blocks``) so that
    its outputs on ``inputs`` match ``targets``: codebooks, scales, offsets and coefficients
    (codes fixed), with ``tune_dense`` the block's norms and biases too; Adam, one step per
    calibration batch, ``epochs`` passes, cosine-decayed step size. Targets are the uncompressed
    block's outputs on the uncompressed model's inputs, so the block also learns to undo the
    error of the compressed blocks before it (AQLM's block fine-tuning; the loss is
    ``relative_error``)."""
    block = blocks.blocks[index]
    codes = list({id(layer.weight_code): layer.weight_code for _, layer in iter_coded(block)}.values())
    trainable = {parameter: parameter.requires_grad for parameter in block.parameters()}
    shared: dict[int, tuple] = {}
    for code in codes:
        code.start_training(shared)
    block.requires_grad_(tune_dense)
    for code in codes:
        code.requires_grad_(True)
    optimizer = torch.optim.Adam([p for p in block.parameters() if p.requires_grad], lr=lr)
    weights = channel_weights(targets, blocks.positions)
    energy = sum(float((t.square() * _positions_weight(w, t) * weights).sum()) for t, w in zip(targets, blocks.positions))
    steps = epochs * len(inputs)
    with _deterministic_algorithms():
        for step in range(steps):
            batch = step % len(inputs)
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(lr, step, steps, warmup=max(1, steps // 20))
            output = blocks.call(index, batch, inputs[batch])
            weight = _positions_weight(blocks.positions[batch], output) * weights
            loss = ((output - targets[batch]).square() * weight).sum() * (len(inputs) / energy)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    for parameter, flag in trainable.items():
        parameter.requires_grad_(flag)
    finished: dict[int, tuple] = {}
    for code in codes:
        code.finish_training(finished)
