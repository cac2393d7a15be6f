"""The "minilm" quality suite for the sentence encoder all-MiniLM-L6-v2.

Three public similarity benchmarks (Lee documents, WordSim353, SimLex999) say
whether a compressed encoder still ranks texts the way people do; the held-out
cosine to the original model says how far its embeddings have drifted.
All data comes from the test folder that ships inside the gensim wheel, so the
suite runs offline.
"""

import numpy as np
import torch
from scipy.stats import spearmanr

from vqcompress.data import ENCODING, data_dir

# Spearman figures of the fp32 model with this exact protocol; a compressed
# model is judged by how far it falls below them.
FP32_REFERENCE = {"lee": 0.508, "wordsim353": 0.729, "simlex999": 0.446}

# all-MiniLM-L6-v2's max_seq_length (sentence_bert_config.json); the longest
# Lee document is 154 tokens, so a shorter cut would change the Lee figure.
MAX_TOKENS = 256

# How many pang_lee_polarity.cor sentences the cosine metric uses (it has 200).
HELD_OUT_SENTENCES = 256



def _lines(name: str) -> list[str]:
    """The non-empty lines of a data file, minus '#' comments."""
    text = (data_dir() / name).read_text(encoding=ENCODING)
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _lee() -> tuple[list[str], np.ndarray]:
    """The 50 Lee documents and the human scores of each pair i<j (the file's
    matrix is upper triangular: its lower half is zeros)."""
    docs = _lines("lee.cor")
    scores = np.loadtxt(data_dir() / "similarities0-1.txt")
    return docs, scores[np.triu_indices(len(docs), k=1)]


def _word_pairs(name: str) -> tuple[list[str], list[str], list[float]]:
    """First words, second words and human scores of a tab-separated pair file."""
    rows = [line.split("\t") for line in _lines(name)]
    return [r[0] for r in rows], [r[1] for r in rows], [float(r[2]) for r in rows]


def _held_out() -> list[str]:
    """Movie-review sentences, apart from the three benchmarks, without their
    fastText '__label__pos ' / '__label__neg ' prefix."""
    lines = _lines("pang_lee_polarity.cor")[:HELD_OUT_SENTENCES]
    return [line.split(" ", 1)[1].strip() for line in lines]


def encode(model, tokenizer, texts: list[str], device: str = "cpu", batch_size: int = 64) -> torch.Tensor:
    """Sentence embeddings as all-MiniLM-L6-v2 defines them: mean of the last
    hidden states over the attention mask, then L2 normalisation.
    The model must already be on `device`; returns (len(texts), hidden) on CPU."""
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths batch with little padding
    longest = min(MAX_TOKENS, getattr(getattr(model, "config", None), "max_position_embeddings", MAX_TOKENS))
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            chunk = [texts[i] for i in order[start:start + batch_size]]
            batch = tokenizer(chunk, padding=True, truncation=True, max_length=longest,
                              return_tensors="pt").to(device)
            hidden = model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(mean, dim=-1).cpu())
    return torch.cat(out)[torch.tensor(order).argsort()]


def _spearman(cosines: torch.Tensor, human) -> float:
    """Rank agreement between model cosines and human scores."""
    return float(spearmanr(cosines.numpy(), human).statistic)


def _word_score(model, tokenizer, name: str, device: str) -> float:
    """Spearman on a word-pair file; each distinct word is encoded once, as a
    one-word sentence."""
    first, second, human = _word_pairs(name)
    words = sorted(set(first + second))
    emb = dict(zip(words, encode(model, tokenizer, words, device)))
    cosines = torch.stack([emb[a] @ emb[b] for a, b in zip(first, second)])
    return _spearman(cosines, human)


def _lee_score(model, tokenizer, device: str) -> float:
    """Spearman between document cosines and human scores over all pairs i<j."""
    docs, human = _lee()
    emb = encode(model, tokenizer, docs, device)
    rows, cols = np.triu_indices(len(docs), k=1)
    return _spearman((emb @ emb.T)[rows, cols], human)


def evaluate(model, tokenizer, reference=None, device: str = "cpu") -> dict[str, float]:
    """The suite's figures for `model` (compare them with FP32_REFERENCE); with
    a `reference` model (same tokenizer), also "cosine": the mean cosine between
    the two models' embeddings of held-out sentences, 1.0 when nothing drifted."""
    scores = {
        "lee": _lee_score(model, tokenizer, device),
        "wordsim353": _word_score(model, tokenizer, "wordsim353.tsv", device),
        "simlex999": _word_score(model, tokenizer, "simlex999.txt", device),
    }
    if reference is not None:
        sentences = _held_out()
        ours = encode(model, tokenizer, sentences, device)
        theirs = encode(reference, tokenizer, sentences, device)
        scores["cosine"] = float((ours * theirs).sum(-1).mean())
    return scores
