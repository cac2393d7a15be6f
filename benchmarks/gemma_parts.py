"""`python -m benchmarks.gemma_parts`: where a compressed Gemma-270M loses its perplexity.

    .venv/bin/python -m benchmarks.gemma_parts FILE.vqc…   # each file's parts, one at a time
    .venv/bin/python -m benchmarks.gemma_parts --embedding  # the tied embedding's own sensitivity

For each file, the dense model with only one part's weights replaced by the file's decoded ones
(the tied token embedding, every Linear layer, attention's, the MLP's), and the embedding's
decoded table on its input side only and on its output side (the tied head) only. With
``--embedding``, the embedding alone under round-to-nearest (an asymmetric grid per 32 weights of
a row), uniform or in tiers by how often the calibration text (wiki, not the evaluation text)
uses each token: this is what says how a budget should be spread over its rows; and, for
scale, every Linear layer under round-to-nearest. Perplexity is
the ``gemma-270m`` suite's. Results go to benchmarks/results/gemma-parts.json and from there
(render.py) to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from torch import nn

from .run import ROOT, machine, now, write_json

RESULTS = ROOT / "benchmarks" / "results" / "gemma-parts.json"
PARTS = {"token embedding (tied head)": r"embed_tokens", "every Linear layer": r"_proj\.", "attention": r"self_attn\.",
         "MLP": r"mlp\."}
USED = -1  # the high tier is every row the calibration text uses
#: (rows in the high tier, its (bits, group), the other rows' (bits, group)); 16 bits: fp16;
#: a group of 640: one grid per row
TIERS = [(0, None, (4, 32)), (0, None, (3, 32)), (0, None, (2, 32)),
         (USED, (16, 0), (3, 32)), (USED, (16, 0), (2, 32)),
         (16384, (8, 640), (3, 32)), (4096, (8, 640), (3, 32)), (16384, (8, 640), (2, 32))]
LINEAR_GRIDS = [(4, 32), (4, 128), (3, 32)]


def perplexity(model: nn.Module, tokenizer) -> float:
    from vqcompress.suites import gemma

    return gemma.evaluate(model, tokenizer)["perplexity"]


def dense_model():
    from transformers import AutoTokenizer

    from vqcompress.models import load_model

    model, source = load_model("gemma-270m")
    return model, AutoTokenizer.from_pretrained(source.path)


def parts(path: Path) -> dict:
    """Perplexity with each part of ``path`` decoded into the dense model, the rest dense."""
    from vqcompress import io
    from vqcompress.layers import densify

    model, tokenizer = dense_model()
    dense = {name: p.detach().clone() for name, p in model.named_parameters()}
    decoded = densify(io.load(path)).state_dict()
    figures = {}
    for part, pattern in PARTS.items():
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                replaced = name in decoded and re.search(pattern, name) and parameter.dim() == 2
                parameter.copy_(decoded[name] if replaced else dense[name])
        figures[part] = perplexity(model, tokenizer)
    table = dense["model.embed_tokens.weight"]
    model.load_state_dict(dense, strict=False)
    model.lm_head.weight = nn.Parameter(table.clone())  # untied: one side at a time
    for side, (inputs, outputs) in {"embedding, input side only": (decoded["model.embed_tokens.weight"], table),
                                    "embedding, output side only": (table, decoded["model.embed_tokens.weight"])}.items():
        with torch.no_grad():
            model.model.embed_tokens.weight.copy_(inputs)
            model.lm_head.weight.copy_(outputs)
        figures[side] = perplexity(model, tokenizer)
    return {"file": path.name, "perplexity": figures, "date": now()}


def round_to_nearest(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Asymmetric round-to-nearest on a ``bits``-bit grid per ``group`` weights of a row."""
    rows, cols = weight.shape
    x = weight.reshape(rows, cols // group, group)
    low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    step = (high - low).clamp_min(1e-8) / (2**bits - 1)
    return (((x - low) / step).round().clamp(0, 2**bits - 1) * step + low).reshape(rows, cols)


def embedding_study() -> list[dict]:
    """The tied embedding alone, by ``TIERS``: its most used rows (by the wiki text's token
    counts) on one grid, the others on another; bits per weight counted with an fp16 scale and
    offset per group (a row's single scale for the int8 tier, nothing for fp16)."""
    from vqcompress.text import causal_lm_data

    model, tokenizer = dense_model()
    table = model.model.embed_tokens.weight
    dense = table.detach().clone()
    counts = causal_lm_data(tokenizer, calib="wiki").token_counts
    order = torch.nn.functional.pad(counts, (0, len(dense) - len(counts))).argsort(descending=True, stable=True)
    used = int((counts > 0).sum())

    def coded(bits: int, group: int) -> tuple[torch.Tensor, float]:
        if bits == 16:
            return dense.half().float(), 16.0
        return round_to_nearest(dense, bits, group), bits + 32 / group

    rows = []
    for top, high, low in TIERS:
        top = used if top == USED else top
        values, low_bits = coded(*low)
        bits = low_bits
        if top:
            high_values, high_bits = coded(*high)
            values[order[:top]] = high_values[order[:top]]
            bits = (top * high_bits + (len(dense) - top) * low_bits) / len(dense)
        with torch.no_grad():
            table.copy_(values)
        rows.append({"top_rows": top, "top": high, "rest": low, "bits_per_weight": bits,
                     "perplexity": perplexity(model, tokenizer)})
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def linear_study() -> list[dict]:
    """Every Linear layer (the embedding dense) under round-to-nearest at ``LINEAR_GRIDS``: how
    sensitive the blocks are to plain grids, for scale."""
    model, tokenizer = dense_model()
    dense = {name: p.detach().clone() for name, p in model.named_parameters() if re.search(PARTS["every Linear layer"], name)}
    parameters = dict(model.named_parameters())
    rows = []
    for bits, group in LINEAR_GRIDS:
        with torch.no_grad():
            for name, weight in dense.items():
                parameters[name].copy_(round_to_nearest(weight, bits, group))
        rows.append({"grid": [bits, group], "bits_per_weight": bits + 32 / group, "perplexity": perplexity(model, tokenizer)})
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main() -> None:
    from . import render

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path, help=".vqc files of gemma-270m to split into parts")
    parser.add_argument("--embedding", action="store_true",
                        help="measure the embedding's tiers, and the Linear layers under plain grids")
    args = parser.parse_args()
    torch.set_num_threads(2)
    result = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"files": [], "embedding": None}
    for path in args.files:
        row = parts(path)
        result["files"] = [r for r in result["files"] if r["file"] != path.name] + [row]
        print(row, file=sys.stderr, flush=True)
    if args.embedding:
        result["embedding"] = {"rows": embedding_study(), "linear": linear_study(), "date": now()}
    result["machine"] = machine()
    write_json(RESULTS, result)
    render.main()


if __name__ == "__main__":
    main()
