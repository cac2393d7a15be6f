"""The model-average bit budget: allocation by measured sensitivity, within the budget, counted as the report counts."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

import vqcompress as vqc
from vqcompress.budget import PerLayer
from vqcompress.compress import compress_with_summary
from vqcompress.errors import VQCError
from vqcompress.finetune import TrainingData, encoder_task


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=8000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=32)
    model = BertModel(config).eval()
    with torch.no_grad():  # one layer far more sensitive than the rest: its output is scaled up
        model.encoder.layer[1].output.dense.weight.mul_(8)
    return model


def text_batches(seed: int = 0) -> TrainingData:
    def batch_at(step: int) -> dict:
        g = torch.Generator().manual_seed(seed * 1000 + step)
        return {"input_ids": torch.randint(0, 8000, (8, 12), generator=g), "attention_mask": torch.ones(8, 12, dtype=torch.long)}

    return TrainingData(encoder_task(), batch_at, calibration_batches=2)


PLAN = vqc.Plan(min_weights=2048)


@pytest.mark.parametrize("bits", [2.0, 3.0])
def test_the_whole_model_averages_at_most_the_budget(bits):
    model, summary = compress_with_summary(tiny_bert(), "kmeans", bits, text_batches(), plan=PLAN, progress=False,
                                           scale="row")
    result = vqc.report(model)
    assert bits - 0.25 < result.model_bits_per_weight <= bits
    per_layer = {row.name: row.bits_per_weight for row in result.coded}
    assert len(set(round(b, 2) for b in per_layer.values())) > 1  # layers got different shares
    assert "share" in summary.allocation


def test_without_allocation_every_layer_gets_the_budget_as_its_ceiling():
    model, summary = compress_with_summary(tiny_bert(), "kmeans", PerLayer(2), text_batches(), plan=PLAN,
                                           progress=False)
    assert all(row.dim * 2 == row.k.bit_length() - 1 or row.bits_per_weight < 2.6 for row in vqc.report(model).coded)
    assert summary.allocation is None and not [name for name in vars(model) if name.startswith("vqc_")]


def test_an_impossible_budget_fails_before_any_layer_is_coded_or_batch_is_read():
    from dataclasses import replace

    model, data, reads = tiny_bert(), text_batches(), []
    counted = replace(data, batch_at=lambda step: reads.append(step) or data.batch_at(step))
    with pytest.raises(VQCError, match="cannot hold this model"):
        vqc.compress(model, "kmeans", 0.5, counted, plan=PLAN, progress=False)
    assert not any(type(m).__name__.startswith("Coded") for m in model.modules())
    assert reads == []  # not one calibration batch: the check comes before the long work


def test_a_method_without_codebook_options_is_allocated_too():
    model = vqc.compress(tiny_bert(), "rtn", 3, text_batches(), plan=PLAN, progress=False, group_size=64)
    assert vqc.report(model).model_bits_per_weight <= 3


def test_high_budgets_are_measured_at_high_levels():
    from vqcompress.allocate import LEVELS, levels

    assert levels(2.1) == LEVELS
    assert levels(3.1) == (2.0, 3.0, 4.0, 5.0, 6.0)
    assert max(levels(4.1)) == 8.0


def test_no_layer_falls_more_than_a_bit_under_the_budget():
    """A 4-bit recognizer's 6,625-way head (8% of its weights) was given 1 bit: 0 lines read."""
    from vqcompress.allocate import levels

    assert min(levels(4)) == 3.0 and min(levels(3.5)) == 2.0 and min(levels(2)) == 1.0


def test_an_embeddings_kept_rows_get_no_noise_in_the_sensitivity_probe():
    """Rows stored exactly leave no error: a loss that only they move makes the layer insensitive."""
    from types import SimpleNamespace

    from vqcompress.allocate import sensitivities
    from vqcompress.calibrate import InputStatistics

    torch.manual_seed(0)
    table = torch.nn.Embedding(100, 8)
    original = table.weight.detach().clone()
    used = torch.cat([torch.full((10,), 100.0), torch.ones(90)])  # rows 0–9 are the most used (and weigh most)
    statistics = {"table": InputStatistics(row_weight=used)}

    def loss() -> float:
        return float((table.weight[:10] - original[:10]).square().sum())

    plain, kept = (sensitivities([SimpleNamespace(name="table", module=table, kept=n)], statistics, loss)[0]
                   for n in (0, 10))
    assert plain > 0 and kept < 1e-9 * plain  # what is left: the rounding of adding and taking off the noise
    assert torch.allclose(table.weight, original)


def test_a_layer_the_plan_gives_bits_keeps_them_and_the_others_share_the_rest():
    pinned = "encoder\\.layer\\.1\\.output\\.dense"
    plan = vqc.Plan(by_name={pinned: {"bits": 1.0}}, min_weights=2048)
    model = vqc.compress(tiny_bert(), "kmeans", 3.0, text_batches(), plan=plan, progress=False, scale="row")
    result = vqc.report(model)
    rows = {row.name: row for row in result.coded}
    # the most sensitive layer would get the most bits; pinned, it gets its own budget's settings
    expected = vqc.compress(tiny_bert(), "kmeans", 1.0, plan=vqc.Plan(by_name={pinned: {}}, min_weights=10**9),
                            progress=False, scale="row")
    assert rows["encoder.layer.1.output.dense"].bits_per_weight == vqc.report(expected).coded[0].bits_per_weight
    assert result.model_bits_per_weight <= 3.0
    assert max(row.bits_per_weight for row in result.coded) > 3.0  # the bits it left went to others


def test_jlcm_levels_are_measured_with_its_own_grouped_fit():
    """Gemma at 3 bits: jlcm's levels were measured with a one-codebook k-means, which saw only the
    cost of its groups; 11 layers went a level down and the perplexity lost 11%."""
    from types import SimpleNamespace

    from vqcompress.allocate import _measure
    from vqcompress.methods import get_method
    from vqcompress.methods.jlcm import JLCMConfig

    g = torch.Generator().manual_seed(0)
    small = 0.1 * torch.randn(64, 64, generator=g)
    two_valued = torch.randint(0, 2, (64, 64), generator=g).float() * 2 - 1  # two codewords hold it exactly
    weight = torch.cat([small, two_valued])[torch.randperm(128, generator=g)]
    jlcm = get_method("jlcm")
    settings = jlcm.settings((128, 64), 1.0, JLCMConfig(dim=1, k=2, groups=2, scale="none"))
    job = SimpleNamespace(module=torch.nn.Linear(64, 128, bias=False), method=jlcm)
    job.module.weight.data = weight
    layout = jlcm.layout((128, 64), settings)
    grouped = _measure(job, None, settings, layout, seed=0)
    one_codebook = _measure(SimpleNamespace(module=job.module, method=get_method("kmeans")), None, settings, layout, 0)
    assert grouped < 0.7 * one_codebook
