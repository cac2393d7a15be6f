"""What a user calibrates with, made into ``TrainingData``: example inputs or text, the task inferred.

``compress(model, ..., calibration=X)`` takes what users have:

- an iterable of examples (a list, a tuple, a ``DataLoader``, a generator): each example is what
  one call of the model takes — a tensor (``model(x)``), a tuple (``model(*x)``, or, when the
  model's ``forward`` takes fewer arguments, ``(inputs, labels)`` as data loaders give them) or a
  dict of tensors (``model(**x)``); a single tensor or dict is one example;
- text, for a model whose folder holds its tokenizer (``from_pretrained`` remembers it): a corpus
  name (``text.CORPORA``), a UTF-8 text file, or a list of strings;
- a ``TrainingData`` (task and batches), used as it is.

The task (which outputs the compressed model must match) is inferred from the model and the first
example, and may be given (``task=``): a causal language model's next-token distributions, an
encoder's token states (its padding left out), a classifier's logits (with its labels when the
examples carry them), else every output tensor by relative squared error.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable
from dataclasses import replace
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import VQCError
from .finetune import Task, TrainingData, causal_lm_task, classification_task, encoder_task
from .source import source_of

#: Examples read from an iterable at most (a data loader over a whole dataset is not read through).
MAX_EXAMPLES = 256


def as_training_data(calibration: Any, model: nn.Module, task: Task | None = None, seed: int = 0,
                     samples: int | None = None) -> TrainingData | None:
    """``calibration`` as ``TrainingData`` for ``model`` (see the module docstring); None stays None."""
    if calibration is None:
        return None
    if isinstance(calibration, TrainingData):
        data = calibration
    elif _is_text(calibration):
        data = text_data(model, calibration, seed, samples)
    else:
        examples = _examples(calibration, samples)
        data = TrainingData(task or infer_task(model, examples[0]), lambda step: examples[step % len(examples)],
                            calibration_batches=len(examples))
    return data if task is None else replace(data, task=task)


def _is_text(calibration: Any) -> bool:
    return isinstance(calibration, (str, os.PathLike)) or (
        isinstance(calibration, (list, tuple)) and bool(calibration) and all(isinstance(t, str) for t in calibration))


def _examples(calibration: Any, samples: int | None) -> list:
    """The examples of ``calibration``: at most ``samples`` (or ``MAX_EXAMPLES``) of an iterable."""
    if isinstance(calibration, (Tensor, dict)):
        examples = [calibration]
    elif isinstance(calibration, Iterable):
        examples = list(islice(calibration, samples or MAX_EXAMPLES))
    else:
        raise VQCError(f"calibration must be example inputs (a list, a DataLoader …), text, or TrainingData, "
                       f"got a {type(calibration).__name__}")
    if not examples:
        raise VQCError("calibration holds no examples")
    for example in examples:
        if not _is_example(example):
            raise VQCError(f"each calibration example must be a tensor, a tuple of tensors or a dict of tensors, "
                           f"got a {type(example).__name__}")
    return examples


def _is_example(example: Any) -> bool:
    if isinstance(example, Tensor):
        return True
    if isinstance(example, dict):
        return bool(example) and all(isinstance(v, Tensor) for v in example.values())
    return isinstance(example, (tuple, list)) and bool(example) and isinstance(example[0], Tensor)


def _takes(model: nn.Module, count: int) -> bool:
    """Whether ``model.forward`` takes ``count`` positional arguments."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return True
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return True
    return count <= sum(p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                        for p in parameters)


def primary_output(output: Any) -> Tensor:
    """The tensor a model's output stands for: itself; a transformers output's ``logits`` or
    ``last_hidden_state``; else the first tensor in it (an LSTM's outputs before its state)."""
    if isinstance(output, Tensor):
        return output
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, Tensor):
            return value
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else []
    for value in values:
        if isinstance(value, Tensor):
            return value
        if isinstance(value, (tuple, list, dict)):
            return primary_output(value)
    raise VQCError(f"the model's output ({type(output).__name__}) holds no tensor to match")


def is_causal_lm(model: nn.Module) -> bool:
    """A model that generates text from an output head (transformers' ``can_generate``)."""
    can_generate = getattr(model, "can_generate", None)
    head = getattr(model, "get_output_embeddings", None)
    return bool(callable(can_generate) and can_generate() and callable(head) and head() is not None)


def infer_task(model: nn.Module | None, example: Any) -> Task:
    """The task for examples like ``example`` (see the module docstring; a tensor's needs no model)."""
    if isinstance(example, dict):
        if is_causal_lm(model):
            return causal_lm_task()
        if "attention_mask" in example and _gives_token_states(model, example):
            return encoder_task()
        return _output_task(lambda m, batch: primary_output(m(**batch)), labelled=False)
    if isinstance(example, Tensor):
        return _output_task(lambda m, batch: primary_output(m(batch)), labelled=False)
    if _takes(model, len(example)):
        return _output_task(lambda m, batch: primary_output(m(*batch)), labelled=False)
    return _output_task(lambda m, batch: primary_output(m(batch[0])), labelled=True)


def _gives_token_states(model: nn.Module, example: dict) -> bool:
    """Whether the model gives token states (``last_hidden_state``) for this example."""
    with torch.no_grad():
        return isinstance(getattr(model(**example), "last_hidden_state", None), Tensor)


def _output_task(forward, labelled: bool) -> Task:
    """Match the primary output: logits of a classifier (2-D float output) by the softened KL
    (and cross-entropy with the examples' labels, when they carry integer labels); probabilities
    (a softmax inside the model) by their KL; anything else by relative squared error."""
    classifier = classification_task()

    def loss(student: Tensor, teacher: Tensor, batch: Any) -> Tensor:
        if student.dim() == 2 and student.is_floating_point() and student.shape[-1] > 1:
            labels = batch[1] if labelled and len(batch) > 1 else None
            usable = isinstance(labels, Tensor) and labels.dtype == torch.int64 and labels.shape == student.shape[:1]
            return classifier.loss(student, teacher, (None, labels if usable else None))
        if _is_distribution(teacher):
            return distribution_divergence(student, teacher)
        return relative_squared_error(student, teacher, batch)

    return Task(forward=forward, loss=loss)


def _is_distribution(output: Tensor) -> bool:
    """Whether an output is probabilities along its last dimension (a softmax inside the model)."""
    return output.is_floating_point() and output.shape[-1] > 1 and bool(
        (output >= 0).all() and torch.allclose(output.float().sum(-1), torch.ones(()), atol=1e-3))


def distribution_divergence(student: Tensor, teacher: Tensor) -> Tensor:
    """KL(teacher ‖ student) per distribution, averaged: probabilities near 0 or 1 count by what
    they decide, not by their tiny squared differences."""
    log_student = student.float().clamp_min(1e-12).log()
    return F.kl_div(log_student.reshape(-1, student.shape[-1]), teacher.float().reshape(-1, teacher.shape[-1]),
                    reduction="batchmean")


def relative_squared_error(student: Tensor, teacher: Tensor, batch: Any = None) -> Tensor:
    """‖student − teacher‖² / ‖teacher‖²: every output counts, whatever its scale."""
    return F.mse_loss(student.float(), teacher.float(), reduction="sum") / teacher.float().square().sum().clamp_min(1e-30)


def tokenizer_folder(model: nn.Module) -> Path | None:
    """The folder the model was loaded from, if it holds a tokenizer."""
    candidates = [source_of(model).path, getattr(getattr(model, "config", None), "_name_or_path", None),
                  getattr(model, "name_or_path", None)]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir() and any(Path(candidate).glob("tokenizer*")):
            return Path(candidate)
    return None


def text_data(model: nn.Module, text: str | os.PathLike | list[str], seed: int = 0,
              samples: int | None = None) -> TrainingData:
    """Batches of ``text`` (a corpus name, a file, or strings) tokenized by the model's own tokenizer:
    token windows for a causal LM, sentences for an encoder."""
    from transformers import AutoTokenizer

    from .text import causal_lm_data, text_training_data

    folder = tokenizer_folder(model)
    if folder is None:
        raise VQCError("calibrating on text needs the model's tokenizer: load the model from a folder that holds "
                       "it, or give tokenized examples (dicts of tensors)")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    source = list(text) if isinstance(text, (list, tuple)) else str(text)
    if is_causal_lm(model):
        return causal_lm_data(tokenizer, seed, calib=source, samples=samples)
    return text_training_data(tokenizer, seed, calib=source, samples=samples)
