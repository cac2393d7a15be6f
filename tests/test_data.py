"""Fine-tuning data: the right task per model, and batches that depend only on (seed, step)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from vqcompress.data import _epoch_order, fashion_training_data, text_training_data, training_data
from vqcompress.errors import VQCError
from vqcompress.models import bundled_path


def test_epoch_order_is_a_fixed_shuffle_per_epoch():
    order = _epoch_order(10, seed=3, batch_size=3)  # 3 batches an epoch, one sample dropped
    first_epoch = torch.cat([order(s) for s in range(3)])
    assert len(set(first_epoch.tolist())) == 9
    assert torch.equal(order(1), _epoch_order(10, seed=3, batch_size=3)(1))
    assert not torch.equal(torch.cat([order(s) for s in range(3, 6)]), first_epoch)
    assert not torch.equal(order(0), _epoch_order(10, seed=4, batch_size=3)(0))


def test_fashion_batches():
    data = fashion_training_data(seed=0, batch_size=16)
    images, labels = data.batch_at(5)
    assert images.shape == (16, 1, 28, 28) and labels.shape == (16,)
    assert torch.equal(fashion_training_data(seed=0, batch_size=16).batch_at(5)[0], images)


def test_text_batches():
    tokenizer = AutoTokenizer.from_pretrained(str(bundled_path("minilm")))
    batch = text_training_data(tokenizer, batch_size=4).batch_at(0)
    assert batch["input_ids"].shape[0] == 4 and batch["attention_mask"].shape == batch["input_ids"].shape


def test_unknown_source_has_no_data():
    with pytest.raises(VQCError, match="calibration=TrainingData"):
        training_data({"kind": "module", "name": "Net"})
