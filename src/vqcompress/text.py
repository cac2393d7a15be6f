"""Text made into calibration and fine-tuning data: a corpus name, a UTF-8 text file or a list of
texts, tokenized by the model's own tokenizer into sentence batches (an encoder) or windows of
``WINDOW`` tokens (a causal LM).

``batch_at(step)`` depends only on the step and the seed (a fixed shuffle per epoch), so a
resumed run sees exactly the batches an uninterrupted one would; calibration statistics use the
first ``calibration_batches`` batches, which together hold the ``samples`` asked for (the batch
size is then the largest divisor of that count up to the usual one). Named corpora are
registered in ``CORPORA`` by whoever ships them (``data``: the corpora installed as packages).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch

from .errors import VQCError
from .finetune import TrainingData, causal_lm_task, encoder_task

WINDOW = 512  # tokens per causal-LM sample
DEFAULT_SAMPLES = {"encoder": 128, "causal": 64, "images": 1024}
#: corpus name → its text
CORPORA: dict[str, Callable[[], str]] = {}


def epoch_order(size: int, seed: int, batch_size: int):
    """step → the indices of that step's batch: a new seeded permutation every epoch, last partial batch dropped."""
    per_epoch = max(1, size // batch_size)

    @lru_cache(maxsize=2)
    def permutation(epoch: int) -> torch.Tensor:
        return torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))

    def indices(step: int) -> torch.Tensor:
        epoch, position = divmod(step, per_epoch)
        return permutation(epoch)[position * batch_size:(position + 1) * batch_size]

    return indices


def _sentences(text: str) -> list[str]:
    """Sentences of at least five words."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 5]


def calibration_text(calib: str | list[str]) -> str:
    """The text of a named corpus, of a UTF-8 text file or of a list of texts (one after another);
    an empty one is refused."""
    if isinstance(calib, list):
        text = "\n\n".join(calib)
    elif calib in CORPORA:
        text = CORPORA[calib]()
    else:
        path = Path(calib)
        if not path.is_file():
            raise VQCError(f"calibration data {calib!r} is neither a file nor a corpus ({', '.join(CORPORA)})")
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as error:
            raise VQCError(f"cannot read calibration file {calib} as UTF-8 text ({error})") from None
    if not text.strip():
        raise VQCError(f"calibration data {_named(calib)} holds no text")
    return text


def _named(calib: str | list[str]) -> str:
    return f"({len(calib)} texts)" if isinstance(calib, list) else repr(calib)


def training_sentences(calib: str | list[str]) -> list[str]:
    """Sentences of ``calib``: a corpus split at sentence ends, a file's non-empty lines, or the
    given texts."""
    if isinstance(calib, list):
        return [line.strip() for line in calib if line.strip()]
    text = calibration_text(calib)
    return _sentences(text) if calib in CORPORA else [line.strip() for line in text.splitlines() if line.strip()]


def pool_size(available: int, samples: int | None, what: str, calib: str) -> int:
    """The pool size: all that are available unless fewer are asked for (more is refused)."""
    if samples is not None and samples < 1:
        raise VQCError(f"--calib-samples must be ≥ 1, got {samples}")
    if available == 0:
        raise VQCError(f"calibration data {_named(calib)} gives no {what}")
    if samples is not None and samples > available:
        raise VQCError(f"calibration data {_named(calib)} gives {available} {what}, fewer than the {samples} asked for")
    return available if samples is None else samples


def dividing_batch_size(size: int, samples: int | None, batch_size: int) -> int:
    """With a pool of exactly ``samples``, the largest batch size up to ``batch_size`` that divides
    it, so the calibration batches hold every sample once."""
    return batch_size if samples is None else max(b for b in range(1, min(batch_size, size) + 1) if size % b == 0)


def calibration_batch_count(size: int, samples: int | None, kind: str, batch_size: int) -> int:
    """Batches that hold the calibration samples: all ``samples`` asked for, else the kind's default
    (fine-tuning still draws from the whole pool)."""
    return max(1, min(size, samples or DEFAULT_SAMPLES[kind]) // batch_size)


def text_training_data(tokenizer, seed: int = 0, batch_size: int = 32, max_tokens: int = 128, *,
                       calib: str | list[str], samples: int | None = None) -> TrainingData:
    """Sentence batches for an encoder; with ``samples``, a fixed pool of that many sentences."""
    sentences = training_sentences(calib)
    if not any(tokenizer(sentences[:64], add_special_tokens=False)["input_ids"]):
        raise VQCError(f"calibration data {_named(calib)} tokenizes to nothing")
    size = pool_size(len(sentences), samples, "sentences", calib)
    pool = sentences if samples is None else [sentences[i] for i in epoch_order(len(sentences), seed, size)(0).tolist()]
    batch_size = dividing_batch_size(size, samples, batch_size)
    order = epoch_order(size, seed, batch_size)

    def batch_at(step: int) -> dict:
        texts = [pool[i] for i in order(step).tolist()]
        return dict(tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"))

    return TrainingData(encoder_task(), batch_at,
                        calibration_batches=calibration_batch_count(size, samples, "encoder", batch_size))


def causal_lm_data(tokenizer, seed: int = 0, batch_size: int = 4, *, calib: str | list[str],
                   samples: int | None = None, limit: int = DEFAULT_SAMPLES["causal"]) -> TrainingData:
    """Windows of ``WINDOW`` tokens of running text for a causal LM (each starts with BOS when
    the tokenizer adds one): ``samples`` of them, by default as many as the text gives up to
    ``limit``."""
    ids = tokenizer(calibration_text(calib), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if not len(ids):
        raise VQCError(f"calibration data {_named(calib)} tokenizes to nothing")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    step = WINDOW - len(bos)
    windows = [torch.cat([torch.tensor(bos, dtype=ids.dtype), ids[i:i + step]]) for i in range(0, len(ids) - step + 1, step)]
    size = pool_size(len(windows), samples, f"windows of {WINDOW} tokens", calib)
    size = size if samples else min(size, limit)
    pool = torch.stack(windows)[:size]
    batch_size = dividing_batch_size(size, size, batch_size)
    order = epoch_order(size, seed, batch_size)
    return TrainingData(causal_lm_task(), lambda s: {"input_ids": pool[order(s)]}, calibration_batches=size // batch_size,
                        token_counts=torch.bincount(ids))
