"""`make bench`: the minilm suite, every configuration in its own process, then the CLI timing.

    .venv/bin/python -m benchmarks.run        # from the repository root; the first 18 rows took ~10 min
                                              # on 2 idle cores, the calibrated ones add minutes each
    .venv/bin/python -m benchmarks.run --only jlcm --only "hqq nbits=2"   # rerun matching rows, keep the rest
    .venv/bin/python -m benchmarks.run --list # the configurations' labels, which --only matches

Each configuration (ours, the peers, fp32) runs in a fresh child process, so its peak memory is
its own and not what an earlier run left behind. The results go to benchmarks/results/minilm.json
and from there (benchmarks/render.py) to docs/benchmarks.md and the rate–distortion plot.

This orchestrating process imports nothing heavy on purpose: Linux counts the parent's resident
memory at spawn time into a child's ``ru_maxrss``, so a parent holding torch would inflate every
peak it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

from . import render

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "minilm.json"
CORES = 2  # the budget the project's timings are stated for; the whole bench is pinned to it
GROUP_SIZE = 64  # rtn's default group, and HQQ's here so the two are alike
FINETUNE_STEPS = 300  # kmeans + the fine-tuning engine: distillation on Lee background sentences
# HQQ's group for the matched-budget rows: the largest that divides every Linear's inputs (384 and
# 1536). HQQ keeps an fp32 scale and zero per group, so it costs nbits + 64/384 bits/w (2.167 at 2
# bits), and 3-bit codes pack ten to 32 bits (3.2 bits/w before the scales: 3.389 in all).
HQQ_MATCHED_GROUP = 384
# qswd's budgets along the rate–distortion curve: a ceiling per layer with codebook and scales counted, so
# 0.1 above each rate of its table (the measured bits are what the plot shows).
RATES = (0.6, 0.85, 1.1, 1.6, 2.1, 3.1, 4.1, 5.1, 6.1)
# Settings keys the bench reads itself and does not pass on to vqcompress.compress.
BENCH_KEYS = ("calib",)

# coremltools at its default per_tensor granularity: one LUT per layer, the same 39 layers as ours.
# per_grouped_channel with small groups is left out: it took 70 s a configuration at 4 bits.
# Calibrated rows (jlcm, and "calib": True) take `bits` as the whole model's average and allocate it
# per layer on the calibration sentences; coremltools-skm weighs its k-means by sensitivities taken
# on the same sentences (benchmarks/peers.py, skm_palettize_calibrated).
CONFIGS = [
    {"method": "fp32", "settings": {}},
    *({"method": "kmeans", "settings": {"bits": b}} for b in (1, 2, 3, 4)),
    {"method": "kmeans", "settings": {"bits": 2, "scale": "row"}},
    {"method": "kmeans", "settings": {"bits": 2, "finetune_steps": FINETUNE_STEPS}},
    *({"method": "rtn", "settings": {"bits": b, "group_size": GROUP_SIZE}} for b in (2, 3, 4)),
    *({"method": "coremltools", "settings": {"n_bits": b}} for b in (1, 2, 3, 4)),
    *({"method": "hqq", "settings": {"nbits": b, "group_size": GROUP_SIZE}} for b in (1, 2, 3, 4)),
    *({"method": "jlcm", "settings": {"bits": b}} for b in (2.1, 3.1)),
    {"method": "jlcm", "settings": {"bits": 2.1, "gradient": "soft"}},
    {"method": "jlcm", "settings": {"bits": 2.1, "gradient": "ste"}},
    {"method": "jlcm", "settings": {"bits": 2.1, "grouping": "none"}},
    *({"method": "kmeans", "settings": {"bits": b, "scale": "row", "calib": True}} for b in (2.1, 3.1)),
    *({"method": "coremltools-skm", "settings": {"n_bits": b}} for b in (2, 3)),
    *({"method": "hqq", "settings": {"nbits": b, "group_size": HQQ_MATCHED_GROUP}} for b in (2, 3)),
    # the rate–distortion curve from 0.5 to 6 bits per weight: qswd against kmeans, rtn and jlcm
    *({"method": "qswd", "settings": {"bits": b}} for b in RATES),
    *({"method": "qswd", "settings": {"bits": b, "calib": True}} for b in (1.1, 2.1, 4.1, 5.1, 6.1)),
    {"method": "qswd", "settings": {"bits": 4.1, "calib": True, "tune_blocks": 25}},
    *({"method": "kmeans", "settings": {"bits": b}} for b in (0.5, 5, 6)),
    *({"method": "rtn", "settings": {"bits": b, "group_size": GROUP_SIZE}} for b in (1, 5, 6)),
    *({"method": "jlcm", "settings": {"bits": b}} for b in (1.25, 4.1, 6.1)),  # 1.21 is its least here
    # 8-dimensional and trellis codes on rotated weights (issue 31), calibrated
    {"method": "vq4all", "settings": {"bits": 2.1, "codebook": "e8p", "transform": "hadamard", "calib": True}},
    *({"method": "vq4all", "settings": {"bits": b, "codebook": "trellis", "transform": "hadamard", "calib": True}}
      for b in (2.1, 3.1)),
    *({"method": "vq4all", "settings": {"bits": b, "codebook": "trellis", "transform": "hadamard",
                                        "finetune_steps": FINETUNE_STEPS}} for b in (2.1, 3.1)),
]

TIMED_COMMAND = ["compress", "minilm", "--method", "kmeans", "--bits", "2", "--quiet"]
TIMED_RUNS = 3


def machine() -> dict:
    """What the numbers were measured on; read without importing torch (see the module doc)."""
    with open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                   platform.processor())
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch": version("torch"),
            "python": platform.python_version(), "os": platform.platform()}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def peak_memory_mib() -> float:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- in the child: one configuration ------------------------------------------------------------

def fp32(model, settings: dict, path: Path):
    """The reference row: nothing compressed; its file is the model.safetensors MiniLM ships."""
    from vqcompress.models import bundled_path

    file_bytes = sum(f.stat().st_size for f in bundled_path("minilm").glob("*.safetensors"))
    return model, {"coded_bits_per_weight": 32.0, "model_bits_per_weight": 32.0, "file_bytes": file_bytes,
                   "compress_seconds": None, "layers": 0, "parameters": sum(p.numel() for p in model.parameters())}


def compress_options(method: str, settings: dict) -> tuple[dict, bool]:
    """The keyword arguments for vqcompress.compress (the bench's own keys dropped) and whether the
    run is calibrated: always for jlcm, which learns on data; with fine-tuning steps; or where the
    settings ask for it with ``"calib": True`` (calibrated fit and per-layer allocation, no training)."""
    options = {k: v for k, v in settings.items() if k not in BENCH_KEYS}
    calibrated = method == "jlcm" or bool(settings.get("calib")) or bool(settings.get("finetune_steps"))
    return options, calibrated


def ours(method: str):
    """A vqcompress method: compress, write the .vqc file, and take the bits from that file."""
    def run(model, settings: dict, path: Path):
        import vqcompress as vqc
        from vqcompress.data import training_data
        from vqcompress.source import source_of

        start = time.perf_counter()
        options, calibrated = compress_options(method, settings)
        calibration = training_data(source_of(model).to_json()) if calibrated else None
        vqc.compress(model, method, progress=False, calibration=calibration, **options)
        seconds = time.perf_counter() - start
        vqc.save(model, path)
        report = vqc.report(path)
        return model, {"coded_bits_per_weight": report.coded_bits_per_weight,
                       "model_bits_per_weight": report.model_bits_per_weight, "file_bytes": report.file_bytes,
                       "compress_seconds": seconds, "layers": len(report.coded),
                       "parameters": report.parameters}
    return run


def peer(compress):
    """A peer compressor: its own count of the bits it stores, plus 32 bits per parameter it left dense."""
    def run(model, settings: dict, path: Path):
        parameters = sum(p.numel() for p in model.parameters())
        result = compress(model, **settings)
        model_bits = result.compressed_bits + 32 * (parameters - result.n_weights)
        details = {k: v for k, v in result.settings.items() if k not in ("layers", "skipped")}
        return result.model, {"coded_bits_per_weight": result.bits_per_weight,
                              "model_bits_per_weight": model_bits / parameters, "file_bytes": None,
                              "compress_seconds": result.seconds, "layers": len(result.settings["layers"]),
                              "parameters": parameters, "details": details}
    return run


def compressors() -> dict:
    """Each compressor: (fp32 model, settings, path for a .vqc file) → (model to score, row fields).

    Built when called, in the child: the peers import torch, which the parent must not (module doc).
    """
    from . import peers

    return {"fp32": fp32, "kmeans": ours("kmeans"), "rtn": ours("rtn"), "jlcm": ours("jlcm"), "qswd": ours("qswd"),
            "vq4all": ours("vq4all"),
            "coremltools": peer(peers.coreml_palettize), "hqq": peer(peers.hqq_quantize),
            "coremltools-skm": peer(peers.skm_palettize_calibrated)}


def measure(config: dict) -> dict:
    """Load MiniLM, compress it as ``config`` says, then score it against fp32.

    Peak memory is read right after compression (and, for ours, the file write): load + compress +
    write is what a user pays; the evaluation, which also loads the fp32 reference, is not.
    Ours is scored on the model reloaded from its file, so the file is what is judged; it is decoded
    to dense layers once (the same weights) because the decode-per-forward path is ~3× slower.
    """
    from transformers import AutoTokenizer

    import vqcompress as vqc
    from vqcompress.layers import densify
    from vqcompress.models import load_model
    from vqcompress.suites import minilm

    model, source = load_model("minilm")
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "minilm.vqc"
        model, row = compressors()[config["method"]](model, config["settings"], path)
        row["peak_memory_mib"] = peak_memory_mib()
        if path.exists():
            del model
            model = densify(vqc.load(path))
    reference, _ = load_model("minilm")
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    row.update(minilm.evaluate(model, tokenizer, reference=reference))
    return {**config, **row, "machine": machine(), "date": now()}


# --- in the parent: every configuration, the timing, the files -----------------------------------

def run_measured(argv: list[str], log: Path | None = None) -> tuple[str, float, float]:
    """Run a command to its end; return its stdout, wall seconds and its own peak memory (MiB);
    its stderr goes to ``log`` where given.

    ``os.wait4`` gives the resource use of exactly this child, where RUSAGE_CHILDREN would give
    the largest of all children so far.
    """
    with tempfile.TemporaryFile("w+") as out, (open(log, "w+") if log else tempfile.TemporaryFile("w+")) as err:
        start = time.perf_counter()
        process = subprocess.Popen(argv, stdout=out, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode:
            err.seek(0)
            raise RuntimeError(f"{' '.join(argv)} failed ({process.returncode}):\n{err.read()[-4000:]}")
        out.seek(0)
        return out.read(), seconds, usage.ru_maxrss / 1024


def run_config(config: dict) -> dict:
    """One configuration in a fresh process; its row is the last line it prints."""
    stdout, seconds, _ = run_measured([sys.executable, "-m", "benchmarks.run", "--one", json.dumps(config)])
    row = json.loads(stdout.strip().splitlines()[-1])
    print(f"{label(config):<40} {row['model_bits_per_weight']:6.3f} bits/w  cosine {row['cosine']:.4f}  "
          f"({seconds:.0f} s)", file=sys.stderr, flush=True)
    return row


def label(config: dict) -> str:
    return " ".join([config["method"], *(f"{k}={v}" for k, v in config["settings"].items())])


def selected(configs: list[dict], patterns: list[str]) -> list[dict]:
    """The configurations whose label holds any of ``patterns`` (exact substrings)."""
    return [c for c in configs if any(p in label(c) for p in patterns)]


def same_config(row: dict, config: dict) -> bool:
    return row["method"] == config["method"] and row["settings"] == config["settings"]


def merge_rows(earlier: list[dict], new: list[dict], configs: list[dict]) -> list[dict]:
    """``earlier`` rows with ``new`` ones put in place of those of the same configuration.

    Rows come in the order of ``configs``; earlier rows of configurations no longer listed are kept,
    after them, in their own order.
    """
    pool = [*new, *(r for r in earlier if not any(same_config(r, n) for n in new))]
    ordered = [r for c in configs for r in pool if same_config(r, c)]
    return ordered + [r for r in pool if not any(same_config(r, c) for c in configs)]


def time_cli() -> dict:
    """The "Done means" check: the whole `vqc compress` command, model load and file write included."""
    vqc = Path(sys.executable).with_name("vqc")
    with tempfile.TemporaryDirectory() as workdir:
        argv = [str(vqc), *TIMED_COMMAND, "-o", str(Path(workdir) / "minilm-2bit.vqc")]
        runs = []
        for _ in range(TIMED_RUNS):
            _, seconds, peak = run_measured(argv)
            runs.append({"seconds": seconds, "peak_memory_mib": peak})
            print(f"vqc {' '.join(TIMED_COMMAND)}: {seconds:.1f} s, {peak:.0f} MiB", file=sys.stderr, flush=True)
    return {"command": " ".join(["vqc", *TIMED_COMMAND, "-o", "OUT.vqc"]), "runs": runs,
            "median_seconds": statistics.median(r["seconds"] for r in runs),
            "max_peak_memory_mib": max(r["peak_memory_mib"] for r in runs),
            "target": {"seconds": 15, "peak_memory_bytes": 2 * 10**9, "cores": CORES},
            "machine": machine(), "date": now()}


def write_json(path: Path, data: dict) -> None:
    """Atomically, so an interrupted bench never leaves a half-written result for render to read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".json.tmp")
    temp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(temp, path)


def rerun(patterns: list[str]) -> None:
    """Measure the configurations matching ``patterns`` and merge their rows into the last results,
    written after each row so an interrupt loses one row at most; the CLI timing is kept."""
    configs = selected(CONFIGS, patterns)
    if not configs:
        raise SystemExit(f"no configuration matches {patterns}; see --list")
    if not RESULTS.exists():
        raise SystemExit(f"{RESULTS.relative_to(ROOT)} does not exist yet: run the whole bench first")
    result = json.loads(RESULTS.read_text())
    for config in configs:
        result["rows"] = merge_rows(result["rows"], [run_config(config)], CONFIGS)
        result["updated"] = now()
        write_json(RESULTS, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", metavar="CONFIG_JSON", help="measure one configuration and print its row (internal)")
    parser.add_argument("--only", metavar="LABEL_SUBSTRING", action="append",
                        help="measure only the configurations whose label (see --list) contains this text "
                             "(repeatable) and merge their rows into the existing results, keeping the others "
                             "and the CLI timing")
    parser.add_argument("--list", action="store_true", help="print the configurations' labels and exit")
    parser.add_argument("--no-render", action="store_true", help="write the results JSON only, not the docs")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    if args.list:
        print("\n".join(label(c) for c in CONFIGS))
        return
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:CORES])  # children inherit the pinning
    if args.only:
        rerun(args.only)
        if not args.no_render:
            render.main()
        return
    started, start = now(), time.perf_counter()
    rows = [run_config(config) for config in CONFIGS]
    timing = time_cli()
    write_json(RESULTS, {"suite": "minilm", "model": "sentence-transformers/all-MiniLM-L6-v2", "started": started,
                         "seconds": time.perf_counter() - start, "rows": rows, "timing": timing})
    if not args.no_render:
        render.main()


if __name__ == "__main__":
    main()
