"""`python -m benchmarks.universal`: VQ4ALL, one universal codebook for MiniLM, Gemma-270M and
the Fashion-MNIST CNN.

    .venv/bin/python -m benchmarks.universal                 # everything (about an hour on 2 cores)
    .venv/bin/python -m benchmarks.universal --only minilm   # rows whose label contains "minilm"

Codebooks (d = 4, k = 256: 2 bits per weight of indices) are built from all three networks and
from every pair, so each network is also coded with a codebook its weights were not used to
build. Rows: each network with each codebook (nearest assignment after the calibrated fit, and
on MiniLM and the CNN progressive distillation too), per-layer kmeans at the same d and k, and
the "ROM" table of total bytes. Results go to benchmarks/results/universal.json; render.py puts
them in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from .run import machine, now, write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "universal.json"
NETWORKS = ("minilm", "gemma-270m", "fashion-cnn")
DIM, K, SAMPLES = 4, 256, 4096
STEPS = {"minilm": 100, "fashion-cnn": 300}  # progressive distillation steps (none on Gemma: CPU time)
CALIB_SAMPLES = {"gemma-270m": 32}  # 512-token windows; the others take their default


def codebook_sets() -> dict[str, tuple[str, ...]]:
    """Label → source networks: all three, and each pair (the third then is unseen)."""
    sets = {"all three": NETWORKS}
    for left_out in NETWORKS:
        sets[f"without {left_out}"] = tuple(n for n in NETWORKS if n != left_out)
    return sets


def build_codebooks(folder: Path) -> dict[str, dict]:
    """Every codebook of ``codebook_sets``, each network loaded once."""
    from vqcompress import universal
    from vqcompress.models import load_model

    layers = {}
    for name in NETWORKS:
        model = load_model(name)[0]
        used, skipped = universal.source_layers(model, DIM)
        layers[name] = ([(n, w.clone()) for n, w in used], skipped)
        del model
    books = {}
    for label, sources in codebook_sets().items():
        start = time.perf_counter()
        book = universal.build_from_layers({n: layers[n] for n in sources}, DIM, K, SAMPLES)
        path = folder / f"{label.replace(' ', '-')}.vqcb"
        book = universal.save_codebook(book, path)
        books[label] = {"path": str(path), "sha256": book.sha256, "sources": list(sources),
                        "bytes": path.stat().st_size, "seconds": time.perf_counter() - start}
    return books


def compress_row(network: str, method: str, options: dict, steps: int, folder: Path, dense: str | None = None) -> dict:
    """Compress ``network`` (calibrated; layers matching the regex ``dense`` left dense), save,
    report, score."""
    from vqcompress import compress, report, save
    from vqcompress.data import training_data
    from vqcompress.models import load_model
    from vqcompress.plan import Plan
    from vqcompress.suites import run_suite

    model, source = load_model(network)
    start = time.perf_counter()
    data = training_data(source.to_json(), 0, None, CALIB_SAMPLES.get(network))
    plan = Plan(by_name={dense: None} if dense else {})
    compressed = compress(model, method, None, data, plan=plan, progress=False, finetune_steps=steps, calibrate=True,
                          **options)
    seconds = time.perf_counter() - start
    path = save(compressed, folder / f"{network}-{method}-{int(time.time())}.vqc", source)
    result = report(path)
    figures = run_suite(None, compressed, source.to_json())
    return {"coded_bits_per_weight": result.coded_bits_per_weight, "model_bits_per_weight": result.model_bits_per_weight,
            "file_bytes": result.file_bytes, "total_bytes": result.total_bits / 8, "coded_layers": len(result.coded),
            "per_layer_codebook_bytes": 2 * K * DIM * len(result.coded),
            "universal_bytes": sum(result.universal.values()) / 8, "seconds": seconds,
            "fp32": figures["fp32"], "compressed": figures["compressed"],
            "peak_memory_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def configurations(books: dict[str, dict]) -> list[dict]:
    rows = []
    for network in NETWORKS:
        for label in books:
            if label != "all three" and network not in label:
                continue  # on each network: the codebook of all three and the one built without it
            rows.append({"network": network, "codebook": label, "assignment": "nearest", "steps": 0})
            if network in STEPS:
                rows.append({"network": network, "codebook": label, "assignment": "progressive", "steps": STEPS[network]})
        if network != "gemma-270m":
            rows.append({"network": network, "codebook": "per-layer kmeans", "assignment": "nearest", "steps": 0})
    # where Gemma's error comes from: the Linear layers alone, its tied embedding left dense
    rows.append({"network": "gemma-270m", "codebook": "all three", "assignment": "nearest", "steps": 0,
                 "dense": "lm_head|model.embed_tokens"})
    return rows


def label(config: dict) -> str:
    dense = f" | dense {config['dense']}" if config.get("dense") else ""
    return f"{config['network']} | {config['codebook']} | {config['assignment']}{dense}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="run rows whose label contains this")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="vq4all-"))
    earlier = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": []}
    books = build_codebooks(folder)
    result = {"machine": machine(), "codebooks": books, "rows": earlier["rows"], "started": now()}
    for config in configurations(books):
        if args.only and not any(p in label(config) for p in args.only):
            continue
        print(f"{now()} {label(config)} …", flush=True)
        if config["codebook"] == "per-layer kmeans":
            options = {"dim": DIM, "k": K, "scale": "row"}
            row = compress_row(config["network"], "kmeans", options, 0, folder)
        else:
            options = {"codebook": books[config["codebook"]]["path"]}
            row = compress_row(config["network"], "vq4all", options, config["steps"], folder, config.get("dense"))
        row.update(config, measured=now(), sha256=books.get(config["codebook"], {}).get("sha256"))
        result["rows"] = [r for r in result["rows"] if label(r) != label(config)] + [row]
        print(json.dumps(row), flush=True)
        write_json(RESULTS, result)


if __name__ == "__main__":
    main()
