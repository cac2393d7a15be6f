"""Training data for fine-tuning, chosen by the source model: a task and a batch for every step.

- zoo models (``fashion-cnn``, ``fashion-vit``): Fashion-MNIST training images with labels;
- ``minilm``: sentences of ``lee_background.cor`` (news; the evaluation uses other texts).

``batch_at(step)`` depends only on the step and the seed (a fixed shuffle per epoch), so a
resumed fine-tuning run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import re
from functools import lru_cache

import torch

from .errors import VQCError
from .finetune import TrainingData, classification_task, encoder_task


def _epoch_order(size: int, seed: int, batch_size: int):
    """step → the indices of that step's batch: a new seeded permutation every epoch, last partial batch dropped."""
    per_epoch = size // batch_size

    @lru_cache(maxsize=2)
    def permutation(epoch: int) -> torch.Tensor:
        return torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))

    def indices(step: int) -> torch.Tensor:
        epoch, position = divmod(step, per_epoch)
        return permutation(epoch)[position * batch_size:(position + 1) * batch_size]

    return indices


def fashion_training_data(seed: int = 0, batch_size: int = 128) -> TrainingData:
    from .models.fashion import load_split

    images, labels = load_split("train")
    order = _epoch_order(len(images), seed, batch_size)
    return TrainingData(classification_task(), lambda step: (images[order(step)], labels[order(step)]))


def training_sentences() -> list[str]:
    """Sentences of the Lee background corpus, at least five words each."""
    from .suites.minilm import ENCODING, data_dir

    text = (data_dir() / "lee_background.cor").read_text(encoding=ENCODING)
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 5]


def text_training_data(tokenizer, seed: int = 0, batch_size: int = 32, max_tokens: int = 128) -> TrainingData:
    sentences = training_sentences()
    order = _epoch_order(len(sentences), seed, batch_size)

    def batch_at(step: int) -> dict:
        texts = [sentences[i] for i in order(step).tolist()]
        return dict(tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"))

    return TrainingData(encoder_task(), batch_at)


def training_data(source: dict, seed: int = 0) -> TrainingData:
    """The fine-tuning data that suits a model from ``source`` (see the module docstring)."""
    if source["kind"] == "zoo":
        return fashion_training_data(seed)
    if source["kind"] == "bundled" and source["name"] == "minilm":
        from transformers import AutoTokenizer

        from .models import model_folder

        return text_training_data(AutoTokenizer.from_pretrained(str(model_folder(source))), seed)
    raise VQCError(f"no fine-tuning data is known for {source['name']!r}: use the Python API with "
                   "calibration=TrainingData(task, batch_at)")
