"""`python -m benchmarks.incoherence`: how close each quantizer comes to the rate–distortion limit,
on i.i.d. Gaussian weights and on every Linear layer of MiniLM and Gemma-270M, as they are and
after the incoherence rotation (``vqcompress.rotation``).

    .venv/bin/python -m benchmarks.incoherence                   # everything (minutes on 2 cores)
    .venv/bin/python -m benchmarks.incoherence --only minilm     # sources whose name contains "minilm"
    .venv/bin/python -m benchmarks.incoherence --quantizer trellis --rotated-only   # those rows only

The figure is the relative squared error ‖W − Ŵ‖² / ‖W‖² of each weight coded alone (no
calibration data: the weight's own error), at about 2 bits per weight; for a Gaussian source at
2 bits the limit is 2^-4 = 0.0625. The rotation is orthogonal, so the error in the rotated basis
is the error of the layer's weight. Kurtosis (3 for a Gaussian) says how heavy-tailed the weights
are before and after. Results go to benchmarks/results/incoherence.json; render.py puts them in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .run import machine, now, write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "incoherence.json"
QUANTIZERS = {"kmeans d=4 k=256": ("kmeans", {"dim": 4, "k": 256, "scale": "none"}),
              "E8P d=8 k=65536": ("vq4all", {"codebook": "e8p"}),
              "trellis L=16, 2 bits": ("vq4all", {"codebook": "trellis"})}
GAUSSIAN_SHAPE = (2048, 2048)
SEED = 0
LIMIT = 2.0**-4  # Gaussian source, 2 bits per sample


def gaussian_layers() -> list[tuple[str, object]]:
    import torch

    generator = torch.Generator().manual_seed(SEED)
    return [("gaussian", torch.randn(*GAUSSIAN_SHAPE, generator=generator))]


def network_layers(network: str) -> list[tuple[str, object]]:
    """Every Linear layer's weight of a bundled network (a head tied to the embedding is the
    embedding: not a Linear of its own)."""
    from torch import nn

    from vqcompress.models import load_model

    model = load_model(network)[0]
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [(name, module.weight.detach().float().clone()) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and id(module.weight) not in embeddings]


SOURCES = {"gaussian": gaussian_layers, "minilm": lambda: network_layers("minilm"),
           "gemma-270m": lambda: network_layers("gemma-270m")}


def kurtosis(weight) -> float:
    centred = weight - weight.mean()
    return float(centred.pow(4).mean() / centred.square().mean().square())


def measure(weight, quantizer: str, rotated: bool, seed: int) -> dict:
    """One weight coded by one quantizer, as it is or rotated: relative error and bits per weight."""
    from vqcompress.methods import get_method, make_config
    from vqcompress.rotation import Rotation

    name, options = QUANTIZERS[quantizer]
    if rotated:
        weight = Rotation(len(weight), weight.shape[1], seed, mix_rows=True).to_stored(weight)
    method = get_method(name)
    settings = method.settings(tuple(weight.shape), None, make_config(method, options))
    start = time.perf_counter()
    code = method.fit(weight, settings, seed)
    error = (code.decode() - weight).square().sum() / weight.square().sum()
    return {"relative_error": float(error), "bits_per_weight": code.nbits() / weight.numel(),
            "kurtosis": kurtosis(weight), "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="sources whose name contains this")
    parser.add_argument("--quantizer", action="append", default=[], help="quantizers whose name contains this")
    parser.add_argument("--rotated-only", action="store_true", help="measure the rotated weights only")
    args = parser.parse_args()
    earlier = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": []}
    result = {"machine": machine(), "limit": LIMIT, "rows": earlier["rows"], "started": now()}
    for source, layers in SOURCES.items():
        if args.only and not any(p in source for p in args.only):
            continue
        print(f"{now()} {source} …", flush=True)
        quantizers = [q for q in QUANTIZERS if not args.quantizer or any(p in q for p in args.quantizer)]
        rows = []
        for index, (layer, weight) in enumerate(layers()):
            for quantizer in quantizers:
                for rotated in (True,) if args.rotated_only else (False, True):
                    row = {"source": source, "layer": layer, "shape": list(weight.shape), "quantizer": quantizer,
                           "rotated": rotated, **measure(weight, quantizer, rotated, SEED + index)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        measured = {(r["source"], r["quantizer"], r["rotated"]) for r in rows}
        result["rows"] = [r for r in result["rows"] if (r["source"], r["quantizer"], r["rotated"]) not in measured] + rows
        result["measured"] = now()
        write_json(RESULTS, result)


if __name__ == "__main__":
    main()
