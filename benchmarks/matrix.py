"""`python -m benchmarks.matrix`: the plain command on every method × model × budget.

    .venv/bin/python -m benchmarks.matrix                      # every cell not measured yet
    .venv/bin/python -m benchmarks.matrix --only minilm --fresh  # measure these cells again
    .venv/bin/python -m benchmarks.matrix --list

Each cell is exactly what a user types, ``vqc compress MODEL --method M --bits B -o F`` with no
other flag, in a fresh process: it either finishes (its file is then scored by ``vqc eval F``, the
model's default suite, against the uncompressed model in the same process) or fails, and a
failure must come in its first seconds as one line (exit code 2, no traceback). A cell's row
records which, the seconds, the peak memory, the file's bits per weight (its bytes × 8 over the
parameters) and the suite's figures. Results go to benchmarks/results/matrix.json, each cell as it
ends (an interrupted run keeps the cells done), and from there (render.py) to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .run import ROOT, machine, now, write_json

RESULTS = ROOT / "benchmarks" / "results" / "matrix.json"
METHODS = ("rtn", "kmeans", "jlcm", "qswd", "vq4all", "vqdnn")
#: bundled models first, then the trained zoo, the real pretrained networks nobody here tuned for, Gemma
MODELS = ("minilm", "fashion-cnn", "fashion-vit", "ppocr-rec", "ppocr-cls", "silero-vad", "gemma-270m")
BITS = (2, 4)
FAST_FAILURE = 30.0  # seconds within which a cell that cannot be done must say so


def cell_name(model: str, method: str, bits: float) -> str:
    return f"{model} {method} {bits:g}"


def _vqc(*args: str) -> list[str]:
    return [sys.executable, "-m", "vqcompress", *args]


def run_cell(model: str, method: str, bits: float) -> dict:
    """One cell: the plain command, then the file's quality (see the module docstring)."""
    row = {"model": model, "method": method, "bits": bits, "measured": now(), "load": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "m.vqc"
        start = time.perf_counter()
        process = subprocess.Popen(_vqc("compress", model, "--method", method, "--bits", str(bits), "-o", str(output),
                                        "--json", "--quiet"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, cwd=ROOT)
        stdout, stderr = process.communicate()
        row["seconds"] = time.perf_counter() - start
        row["traceback"] = "Traceback" in stderr
        if process.returncode:
            errors = [line for line in stderr.splitlines() if line.startswith("error:")]
            row.update(status="refused" if process.returncode == 2 and errors else "failed", returncode=process.returncode,
                       message=(errors or stderr.strip().splitlines()[-1:] or [""])[-1])
            return row
        result = json.loads(stdout)
        row.update(status="finished", said=[line for line in stderr.splitlines() if line and "it/s]" not in line][-8:],
                   file_bytes=output.stat().st_size, parameters=result["parameters"],
                   bits_per_weight=output.stat().st_size * 8 / result["parameters"],
                   peak_memory_mib=result["peak_memory_mib"], settings=result["settings"])
        scored = subprocess.run(_vqc("eval", str(output), "--json"), capture_output=True, text=True, cwd=ROOT)
        row["traceback"] |= "Traceback" in scored.stderr
        if scored.returncode:
            row.update(status="finished, not scored", message=(scored.stderr.strip().splitlines() or [""])[-1])
        else:
            figures = json.loads(scored.stdout)
            row.update(suite=figures["suite"], fp32=figures["fp32"], compressed=figures["compressed"])
    return row


def cells(patterns: list[str]) -> list[tuple[str, str, int]]:
    every = [(model, method, bits) for model in MODELS for method in METHODS for bits in BITS]
    return [cell for cell in every if not patterns or any(re.search(p, cell_name(*cell)) for p in patterns)]


def _measured() -> dict[str, dict]:
    """The cells in the results file now, by name."""
    rows = json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else []
    return {cell_name(r["model"], r["method"], r["bits"]): r for r in rows}


def _record(row: dict) -> None:
    """Put one cell's row into the results file, read again just before (so two runs of
    different cells side by side keep each other's rows)."""
    done = _measured() | {cell_name(row["model"], row["method"], row["bits"]): row}
    order = {cell_name(*c): i for i, c in enumerate(cells([]))}
    write_json(RESULTS, {"machine": machine(), "fast_failure_seconds": FAST_FAILURE,
                         "rows": sorted(done.values(), key=lambda r: order.get(cell_name(r["model"], r["method"], r["bits"]), 0))})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[], help="regex of cells ('MODEL METHOD BITS') to run")
    parser.add_argument("--fresh", action="store_true", help="measure the chosen cells again even if measured")
    parser.add_argument("--list", action="store_true", help="list the cells and exit")
    args = parser.parse_args()
    chosen = cells(args.only)
    if args.list:
        print("\n".join(cell_name(*cell) for cell in chosen))
        return
    for cell in chosen:
        name = cell_name(*cell)
        if name in _measured() and not args.fresh:
            continue
        print(f"{name} …", file=sys.stderr, flush=True)
        row = run_cell(*cell)
        print(f"{name}: {row['status']} in {row['seconds']:.0f} s" + (f" ({row.get('message')})" if "message" in row else ""),
              file=sys.stderr, flush=True)
        _record(row)
    from . import render

    render.main()


if __name__ == "__main__":
    main()
