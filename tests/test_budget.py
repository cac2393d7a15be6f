"""The budget: one type per meaning, a plain number resolved in one place, bad numbers refused."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import vqcompress as vqc
from vqcompress.budget import ModelAverage, PerLayer, resolve
from vqcompress.errors import VQCError
from vqcompress.finetune import TrainingData, classification_task


@pytest.mark.parametrize("bits", [math.nan, math.inf, -1, 0, "abc", True, 16, 100])
def test_a_budget_that_is_no_number_of_bits_is_refused(bits):
    with pytest.raises(VQCError, match="bits"):
        resolve(bits, calibrated=False)
    with pytest.raises(VQCError, match="bits"):
        vqc.compress(nn.Linear(64, 128), "kmeans", bits, progress=False)


def test_a_plain_number_is_the_average_when_calibrated_else_each_layers_ceiling():
    assert resolve(2.5, calibrated=True) == ModelAverage(2.5)
    assert resolve(2.5, calibrated=False) == PerLayer(2.5)
    assert resolve(PerLayer(3), calibrated=True) == PerLayer(3)
    assert resolve(None, calibrated=True) is None


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()


def _data() -> TrainingData:
    batches = [torch.randn(16, 256, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    return TrainingData(classification_task(), lambda step: (batches[step % 2], None), calibration_batches=2)


def test_rtn_meets_a_model_average_between_whole_bits():
    """rtn codes whole bits per layer; the model's 2.5 on average mixes them (it was refused)."""
    model = vqc.compress(_mlp(), "rtn", 2.5, _data(), progress=False)
    report = vqc.report(model)
    assert report.model_bits_per_weight <= 2.5
    assert {row.k for row in report.coded} <= {2, 4, 8, 16, 256}


def test_a_model_average_without_data_is_spread_by_weight_error():
    model = vqc.compress(_mlp(), "rtn", ModelAverage(3.5), progress=False)
    assert vqc.report(model).model_bits_per_weight <= 3.5
    with pytest.raises(VQCError, match="whole number of bits"):
        vqc.compress(_mlp(), "rtn", 2.5, progress=False)  # data-free, a plain number is each layer's ceiling


def test_a_methods_own_option_goes_to_the_method_never_to_the_pipeline():
    """``compress(…, method="jlcm", lr=0.05)`` was taken as the fine-tuning rate."""
    model = vqc.compress(_mlp(), "jlcm", 3, _data(), lr=0.05, progress=False)
    assert all(layer.weight_code.recipe["lr"] == 0.05 for layer in (model[0], model[2]))


def test_what_a_run_is_not_is_said(caplog):
    """jlcm without calibration data ran uncalibrated without a word; a budget above what a method
    codes was capped in silence."""
    import logging

    with caplog.at_level(logging.WARNING, logger="vqcompress"):
        vqc.compress(_mlp(), "jlcm", 2, progress=False)
        vqc.compress(_mlp(), "kmeans", PerLayer(12), progress=False)
    assert "none were given" in caplog.text
    assert "capped there" in caplog.text


def test_a_model_average_above_what_a_method_spends_is_said(caplog):
    """vq4all's universal codebook has one cost: asked for 4 bits on average it wrote 2.09 in silence."""
    import logging

    with caplog.at_level(logging.WARNING, logger="vqcompress"):
        model = vqc.compress(_mlp(), "vq4all", ModelAverage(4), progress=False)
    assert "capped there" in caplog.text
    assert vqc.report(model).model_bits_per_weight < 3
