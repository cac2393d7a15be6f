"""The plain command's choices: what recipes used to spell out by hand, chosen from the model's
structure (never its name), each said aloud and each overridden by what the user gives.

- A token table tied to the output head with a large vocabulary (≥ ``LARGE_VOCABULARY`` rows:
  every row is both an input and an output logit, and a few of them carry most of any text),
  under a calibrated model-average budget of b bits: its most used rows are kept apart in int8
  (``KEPT_SHARE`` of the whole budget's bits buy them), the rest coded at ``b - 1`` index bits;
  the blocks share what is left.
- A causal language model with repeated blocks, calibrated: each block is tuned for
  ``TUNE_BLOCKS`` pass towards the uncompressed block's outputs, on ``CAUSAL_SAMPLES`` windows.
- A method that learns its codebooks in training, given no steps: ``training_steps``.
- Fine-tuning a written file (``vqc finetune``): its learning rate and, for a causal LM, a pool of
  up to ``FINETUNE_WINDOWS`` windows, by the model's size (``finetune_settings``).

docs/methods.md has the measurements these come from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .budget import Budget, ModelAverage
from .calibrate import find_blocks
from .inputs import is_causal_lm
from .plan import Plan

LARGE_VOCABULARY = 1 << 15
KEPT_SHARE = 0.145  # of the model's budget bits: Gemma-270M at 3 bits, 22,528 of 262,144 rows
KEPT_ROUND = 1024
TUNE_BLOCKS = 1
CAUSAL_SAMPLES = 128
#: Training steps for a method that needs them when none are given: fewer for large models,
#: whose steps take a minute each on a CPU.
STEPS_SMALL, STEPS_LARGE, LARGE_MODEL = 300, 24, 100_000_000
FINETUNE_LR_SMALL, FINETUNE_LR_LARGE = 1e-3, 1e-4
FINETUNE_WINDOWS = 1024


@dataclass
class Choices:
    """What the structure chose: plan entries by name, block tuning, and the sentences saying so."""

    by_name: dict[str, dict] = field(default_factory=dict)
    tune_blocks: int = 0
    said: list[str] = field(default_factory=list)


def tied_token_table(model: nn.Module) -> tuple[str, nn.Embedding] | None:
    """The model's input token table when it is also its output head and has a large vocabulary."""
    inputs = getattr(model, "get_input_embeddings", lambda: None)()
    outputs = getattr(model, "get_output_embeddings", lambda: None)()
    if (not isinstance(inputs, nn.Embedding) or outputs is None or getattr(outputs, "weight", None) is not inputs.weight
            or inputs.num_embeddings < LARGE_VOCABULARY):
        return None
    return next((name, module) for name, module in model.named_modules() if module is inputs)


def choose(model: nn.Module, plan: Plan, budget: Budget | None, calibrated: bool,
           tune_blocks: int | None) -> Choices:
    """The structure's choices for this run; a layer the plan already names is left as it says,
    a ``tune_blocks`` given is kept."""
    choices = Choices(tune_blocks=tune_blocks or 0)
    table = tied_token_table(model)
    if table is not None and calibrated and isinstance(budget, ModelAverage):
        name, module = table
        if not any(re.fullmatch(pattern, name) for pattern in plan.by_name):
            parameters = sum(p.numel() for p in model.parameters())
            row_bits = module.embedding_dim * 8 + 16 + 32  # int8 values, fp16 scale, int32 row number
            rows = min(module.num_embeddings // 4,
                       round(KEPT_SHARE * budget.bits * parameters / row_bits / KEPT_ROUND) * KEPT_ROUND)
            index_bits = max(1.0, budget.bits - 1)
            choices.by_name[re.escape(name)] = {"keep_rows": rows, "bits": index_bits}
            choices.said.append(f"{name} (a {module.num_embeddings:,}-row token table tied to the output head) keeps "
                                f"its {rows:,} most used rows apart in int8 and codes the rest at {index_bits:g} index "
                                f"bits (--keep-rows / --layer to choose otherwise)")
    if tune_blocks is None and calibrated and is_causal_lm(model) and find_blocks(model) is not None:
        choices.tune_blocks = TUNE_BLOCKS
        choices.said.append(f"each block is tuned for {TUNE_BLOCKS} pass towards the original block's outputs "
                            "(--tune-blocks 0 to skip)")
    return choices


def calibration_samples(model: nn.Module) -> int | None:
    """How many calibration samples suit the model when the user names none (None: the data's own)."""
    return CAUSAL_SAMPLES if is_causal_lm(model) else None


def training_steps(model: nn.Module) -> int:
    """Steps for a method that learns in training, when none are given."""
    return STEPS_LARGE if sum(p.numel() for p in model.parameters()) >= LARGE_MODEL else STEPS_SMALL


def finetune_settings(model: nn.Module) -> tuple[float, int]:
    """(learning rate, causal-LM windows at most) for distilling a file from ``model``: a smaller
    step for a large model (Gemma-270M: 10⁻⁴; MiniLM and the zoo: 10⁻³)."""
    large = sum(p.numel() for p in model.parameters()) >= LARGE_MODEL
    return (FINETUNE_LR_LARGE if large else FINETUNE_LR_SMALL), FINETUNE_WINDOWS
