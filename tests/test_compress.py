"""``compress`` with training: data and steps come together, and vqdnn learns in training."""

from __future__ import annotations

import copy

import pytest

import vqcompress as vqc
from vqcompress.errors import VQCError
from vqcompress.finetune import TrainingData, classification_task
from vqcompress.layers import iter_coded
from tests.test_finetune import batch_at, distillation_loss, mlp

DATA = TrainingData(classification_task(), batch_at)
EVERY_LAYER = vqc.Plan(min_weights=0)


@pytest.mark.parametrize(("method", "calibration", "steps", "message"), [
    ("vqdnn", None, 0, "learns its codebooks in training"),
    ("vqdnn", DATA, 0, "learns its codebooks in training"),
    ("kmeans", None, 10, "needs training data"),
    ("kmeans", DATA, 0, "no fine-tuning steps"),
    ("kmeans", DATA, -1, "≥ 0"),
])
def test_training_arguments_are_checked_before_work(method, calibration, steps, message):
    model = mlp()
    with pytest.raises(VQCError, match=message):
        vqc.compress(model, method, bits=1, calibration=calibration, finetune_steps=steps, plan=EVERY_LAYER,
                     progress=False)
    assert not list(iter_coded(model))


def test_vqdnn_and_finetuned_kmeans_beat_plain_kmeans():
    teacher = mlp()
    plain = vqc.compress(copy.deepcopy(teacher), "kmeans", bits=1, plan=EVERY_LAYER, progress=False)
    tuned = vqc.compress(copy.deepcopy(teacher), "kmeans", bits=1, calibration=DATA, finetune_steps=60, lr=3e-3,
                         plan=EVERY_LAYER, progress=False)
    learned = vqc.compress(copy.deepcopy(teacher), "vqdnn", bits=1, calibration=DATA, finetune_steps=60, lr=3e-3,
                           plan=EVERY_LAYER, progress=False)
    assert distillation_loss(tuned, teacher) < distillation_loss(plain, teacher)
    assert distillation_loss(learned, teacher) < distillation_loss(plain, teacher)
    assert vqc.report(learned).coded_bits == vqc.report(plain).coded_bits
    assert {layer.weight_code.recipe["method"] for _, layer in iter_coded(learned)} == {"vqdnn"}
