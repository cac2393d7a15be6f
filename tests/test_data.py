"""Fine-tuning data: the right task per model, and batches that depend only on (seed, step)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from vqcompress.data import fashion_training_data, training_data
from vqcompress.errors import VQCError
from vqcompress.models import bundled_path
from vqcompress.text import epoch_order, text_training_data


def test_epoch_order_is_a_fixed_shuffle_per_epoch():
    order = epoch_order(10, seed=3, batch_size=3)  # 3 batches an epoch, one sample dropped
    first_epoch = torch.cat([order(s) for s in range(3)])
    assert len(set(first_epoch.tolist())) == 9
    assert torch.equal(order(1), epoch_order(10, seed=3, batch_size=3)(1))
    assert not torch.equal(torch.cat([order(s) for s in range(3, 6)]), first_epoch)
    assert not torch.equal(order(0), epoch_order(10, seed=4, batch_size=3)(0))


def test_fashion_batches():
    data = fashion_training_data(seed=0, batch_size=16)
    images, labels = data.batch_at(5)
    assert images.shape == (16, 1, 28, 28) and labels.shape == (16,)
    assert torch.equal(fashion_training_data(seed=0, batch_size=16).batch_at(5)[0], images)


def test_text_batches():
    tokenizer = AutoTokenizer.from_pretrained(str(bundled_path("minilm")))
    batch = text_training_data(tokenizer, batch_size=4, calib="lee-background").batch_at(0)
    assert batch["input_ids"].shape[0] == 4 and batch["attention_mask"].shape == batch["input_ids"].shape


def test_unknown_source_has_no_data():
    with pytest.raises(VQCError, match="calibration=\\[example inputs"):
        training_data({"kind": "module", "name": "Net"})


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return AutoTokenizer.from_pretrained(str(bundled_path("minilm")))


@pytest.mark.parametrize(("content", "samples", "message"), [
    (None, None, "neither a file nor a corpus"),
    ("", None, "holds no text"),
    ("   \n\n  ", None, "holds no text"),
    ("\u200b\u200b\n", None, "tokenizes to nothing"),
    ("one line of text\nand another\n", 5, "gives 2 sentences, fewer than the 5 asked for"),
    ("one line\n", 0, "must be ≥ 1"),
])
def test_bad_calibration_text_is_refused(tmp_path, minilm_tokenizer, content, samples, message):
    path = tmp_path / "calib.txt"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(VQCError, match=message):
        text_training_data(minilm_tokenizer, calib=str(path), samples=samples)


def test_calibration_from_a_file_uses_exactly_the_samples_asked_for(tmp_path, minilm_tokenizer):
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(f"sentence number {i} about nothing much" for i in range(50)), encoding="utf-8")
    data = text_training_data(minilm_tokenizer, calib=str(path), samples=40, batch_size=16)
    assert data.calibration_batches == 4  # batches of 10: every sample once
    seen = {tuple(row.tolist()) for step in range(4) for row in data.batch_at(step)["input_ids"]}
    assert len(seen) == 40


def test_causal_windows_have_the_window_length(minilm_tokenizer):
    from vqcompress.text import WINDOW, causal_lm_data

    data = causal_lm_data(minilm_tokenizer, calib="lee-background", samples=4, batch_size=2)
    batch = data.batch_at(0)["input_ids"]
    assert batch.shape == (2, WINDOW) and data.calibration_batches == 2


def test_causal_data_counts_every_token_of_the_calibration_text(minilm_tokenizer):
    """Token counts cover the whole text, not only the calibration windows."""
    from vqcompress.text import calibration_text, causal_lm_data

    data = causal_lm_data(minilm_tokenizer, calib="lee-background", samples=1, batch_size=1)
    ids = minilm_tokenizer(calibration_text("lee-background"), add_special_tokens=False)["input_ids"]
    assert int(data.token_counts.sum()) == len(ids) > int(data.batch_at(0)["input_ids"].numel())
    assert int(data.token_counts[ids[0]]) == ids.count(ids[0])
