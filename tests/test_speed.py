"""`vqc bench-speed` and the speed module: every coded layer type timed against its dense twin,
tokens per second for a causal LM, resident weights counted once, user mistakes in one line."""

from __future__ import annotations

import json

import pytest
import torch

import vqcompress as vqc
from tests.test_cli import assert_clean_failure, vqc_cli
from vqcompress.speed import bench_speed, resident_bytes


@pytest.fixture(scope="module")
def tiny_lm_file(tmp_path_factory):
    """A randomly initialised two-layer Llama saved as a model folder, compressed at 2 bits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder / "model")
    out = folder / "lm.vqc"
    result = vqc_cli("compress", str(folder / "model"), "--dim", "4", "--k", "256", "-o", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    return out


def test_bench_speed_on_a_causal_lm(tiny_lm_file):
    result = vqc_cli("bench-speed", str(tiny_lm_file), "--repeats", "2", "--tokens", "3", "--batch", "1",
                     "--batch", "4", "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["backend"] and figures["repeats"] == 2
    assert {row["batch"] for row in figures["layers"]} == {1, 4}
    assert all(row["dense_ms"] > 0 and row["coded_ms"] > 0 for row in figures["layers"])
    assert figures["generation"]["new_tokens"] == 3 and figures["generation"]["coded_tokens_per_s"] > 0
    memory = figures["memory"]
    assert memory["coded_weight_bytes"] < memory["dense_weight_bytes"] / 2 and memory["peak_rss_mib"] > 0
    table = vqc_cli("bench-speed", str(tiny_lm_file), "--repeats", "1", "--tokens", "2")
    assert table.returncode == 0 and "tokens/s" in table.stdout and "kernel:" in table.stdout


def test_every_coded_layer_type_is_timed(tiny):
    model = vqc.compress(tiny, "kmeans", bits=2, progress=False)
    report = bench_speed(model, repeats=1, batches=(1, 2))
    assert {(row.kind, row.batch) for row in report.layers} == {(kind, batch) for kind in ("Linear", "Conv1d", "Conv2d")
                                                                 for batch in (1, 2)}
    assert not report.model and not report.generation  # a plain module: its input is unknown
    assert "resident weights" in str(report)


def test_shared_tensors_are_counted_once():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False))
    model[1].weight = model[0].weight
    assert resident_bytes(model) == 8 * 8 * 4


@pytest.mark.parametrize(("args", "message"), [(["--repeats", "0"], "at least 1"), (["--batch", "0"], "at least 1")])
def test_bad_settings_fail_before_loading(tmp_path, args, message):
    assert_clean_failure(vqc_cli("bench-speed", str(tmp_path / "missing.vqc"), *args), message)


def test_missing_file(tmp_path):
    assert_clean_failure(vqc_cli("bench-speed", str(tmp_path / "missing.vqc")), "no such file")

