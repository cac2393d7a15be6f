"""The "gemma-270m" quality suite: perplexity of the causal LM Gemma-3-270M (lower is better).

The text is the start of gensim's lee_background.cor (Australian news, from the test folder that
ships inside the gensim wheel), so the suite runs offline. Protocol: the text tokenized as the
tokenizer does by default (one BOS at its very start), its first ``tokens`` tokens cut into
non-overlapping windows of ``window`` tokens, each evaluated on its own; perplexity is exp of the
mean next-token NLL over every predicted token (``window - 1`` per window). Only the first window
starts with BOS: that is the protocol behind the reference figure (the dense model gives 38.37).
Gemma leans hard on BOS, so starting every window with one would give about 19.7 instead, and a
text with no BOS at all about 49.
"""

from __future__ import annotations

import math

import torch

from ..data import lee_background

# Perplexity of the dense (dequantized) model with this exact protocol.
FP32_REFERENCE = {"perplexity": 38.37}


def text() -> str:
    """The whole of lee_background.cor (300 news articles, one a line)."""
    return lee_background()


def windows(ids: list[int], tokens: int = 2048, window: int = 512) -> list[list[int]]:
    """The first ``tokens`` ids cut into consecutive, non-overlapping windows of ``window`` ids (the
    last one shorter if ``window`` does not divide ``tokens``); a window of one id predicts nothing,
    so it is dropped."""
    ids = ids[:tokens]
    return [ids[start:start + window] for start in range(0, len(ids), window) if len(ids) - start > 1]


def evaluate(model, tokenizer, device: str = "cpu", tokens: int = 2048, window: int = 512) -> dict[str, float]:
    """``{"perplexity": ...}`` of ``model`` (already on ``device``) on the suite's text."""
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for ids in windows(tokenizer(text()).input_ids, tokens, window):
            batch = torch.tensor([ids], device=device)
            logits = model(batch, use_cache=False).logits[0, :-1].float()  # one pass: a KV cache is waste
            total += torch.nn.functional.cross_entropy(logits, batch[0, 1:], reduction="sum").item()
            count += len(ids) - 1
    return {"perplexity": math.exp(total / count)}
