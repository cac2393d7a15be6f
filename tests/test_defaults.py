"""The plain command's choices come from the model's structure, never its name, and give way to the user's."""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from vqcompress import defaults
from vqcompress.budget import ModelAverage, PerLayer
from vqcompress.plan import Plan


def _lm(tied: bool, vocab: int = 1 << 15) -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


def test_a_large_tied_token_table_keeps_its_most_used_rows_and_blocks_are_tuned():
    model = _lm(tied=True)
    choices = defaults.choose(model, Plan(), ModelAverage(3), calibrated=True, tune_blocks=None)
    entry = choices.by_name[r"model\.embed_tokens"]
    row_bits = 16 * 8 + 16 + 32
    parameters = sum(p.numel() for p in model.parameters())
    assert entry["bits"] == 2
    assert abs(entry["keep_rows"] * row_bits - defaults.KEPT_SHARE * 3 * parameters) <= defaults.KEPT_ROUND * row_bits
    assert choices.tune_blocks == 1 and len(choices.said) == 2


def test_what_the_user_gives_wins_and_nothing_is_chosen_without_its_grounds():
    model = _lm(tied=True)
    named = Plan(by_name={r"model\.embed_tokens": {"keep_rows": 0}})
    assert defaults.choose(model, named, ModelAverage(3), True, 0).by_name == {}
    assert defaults.choose(model, named, ModelAverage(3), True, 0).tune_blocks == 0
    assert defaults.choose(model, Plan(), PerLayer(3), True, None).by_name == {}  # no model average to share
    assert defaults.choose(model, Plan(), ModelAverage(3), False, None).by_name == {}  # no token counts
    assert defaults.choose(_lm(tied=False), Plan(), ModelAverage(3), True, None).by_name == {}
    assert defaults.choose(_lm(tied=True, vocab=1000), Plan(), ModelAverage(3), True, None).by_name == {}


def test_a_method_that_trains_gets_steps_by_the_models_size():
    assert defaults.training_steps(nn.Linear(64, 64)) == defaults.STEPS_SMALL
    assert defaults.calibration_samples(_lm(tied=True)) == defaults.CAUSAL_SAMPLES
    assert defaults.calibration_samples(nn.Linear(4, 4)) is None
