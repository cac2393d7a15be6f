"""`python -m benchmarks.gemma`: Gemma-270M compressed by our methods, perplexity against dense.

    .venv/bin/python -m benchmarks.gemma                 # every configuration (each takes minutes)
    .venv/bin/python -m benchmarks.gemma --only "qswd"   # rerun matching rows, keep the rest
    .venv/bin/python -m benchmarks.gemma --list

Each configuration is the command line a user types, ``vqc compress gemma-270m … --json``, run in
a fresh process pinned to two cores: its wall time and peak memory are the whole command's (model
load, calibration, fit, file write). The file it writes is then scored with ``vqc eval`` (the
``gemma-270m`` suite: perplexity on the first 2,048 tokens of lee_background in 512-token
windows); the dense model is scored in the same run. Calibration uses the wiki corpus (never the
evaluation text). A ``FINETUNED`` row is ``vqc finetune`` of an earlier row's kept file (its time
and peak memory are added to that row's). Peers (``PEERS``: HQQ, coremltools SKM) code the blocks' Linear layers in place
in a fresh process each, beside our rows that code the same layers (labels "… Linear layers
only"). Results go to benchmarks/results/gemma.json and from there (render.py) to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from . import render
from .run import CORES, ROOT, machine, now, run_measured, write_json

RESULTS = ROOT / "benchmarks" / "results" / "gemma.json"
LOGS = ROOT / "out" / "gemma-bench"
#: the tied token embedding and head, left dense where the peers' rows are compared (HQQ codes
#: Linear layers only)
SKIP_EMBEDDING = r"model\.embed_tokens|lm_head"
#: the tied token embedding and head at round-to-nearest 8 bits (an fp16 scale a row)
EMBEDDING_8_BITS = r"model\.embed_tokens:method=rtn,bits=8"
#: label → the arguments after ``vqc compress gemma-270m``
CONFIGS = {
    "kmeans 2 bits, row scales (data-free)": ["--method", "kmeans", "--dim", "4", "--k", "256", "--scale", "row"],
    "jlcm 2.1 bits": ["--method", "jlcm", "--bits", "2.1"],
    "jlcm 2.1 bits per Linear layer, embedding kmeans 4 bits + 8192 rows kept in int8": [
        "--method", "jlcm", "--bits", "2.1", "--per-layer-bits", "--calib", "wiki", "--keep-rows", "8192",
        "-L", "model\\.embed_tokens:method=kmeans,bits=4,scale=row"],
    "jlcm 2.1 bits per Linear layer, embedding kmeans 4 bits + 8192 rows kept in int8, tuned blocks": [
        "--method", "jlcm", "--bits", "2.1", "--per-layer-bits", "--calib", "wiki", "--keep-rows", "8192",
        "-L", "model\\.embed_tokens:method=kmeans,bits=4,scale=row", "--tune-blocks", "2"],
    "qswd 2.1 bits per Linear layer, calibrated on 128 windows, embedding kmeans 4 bits + 8192 rows kept in int8, tuned blocks": [
        "--method", "qswd", "--bits", "2.1", "--per-layer-bits", "--calib", "wiki", "--calib-samples", "128",
        "--keep-rows", "8192", "-L", "model\\.embed_tokens:method=kmeans,bits=4,scale=row", "--tune-blocks", "1"],
    "qswd 3.1 bits, calibrated": ["--method", "qswd", "--bits", "3.1", "--calib", "wiki"],
    "qswd 3.0 bits, calibrated, 8192 token rows kept in int8": ["--method", "qswd", "--bits", "3.0", "--calib", "wiki",
                                                                "--keep-rows", "8192"],
    "qswd 3.0 bits, calibrated, 16384 token rows kept in int8": ["--method", "qswd", "--bits", "3.0", "--calib", "wiki",
                                                                 "--keep-rows", "16384"],
    "qswd 3.0 bits, calibrated, 16384 token rows kept in int8, tuned blocks": [
        "--method", "qswd", "--bits", "3.0", "--calib", "wiki", "--keep-rows", "16384", "--tune-blocks", "2"],
    "qswd 3.0 bits, calibrated on 128 windows, 16384 token rows kept in int8, tuned blocks": [
        "--method", "qswd", "--bits", "3.0", "--calib", "wiki", "--calib-samples", "128", "--keep-rows", "16384",
        "--tune-blocks", "1"],
    "qswd 3.0 bits, calibrated on 128 windows, 32768 token rows kept in int8, tuned blocks": [
        "--method", "qswd", "--bits", "3.0", "--calib", "wiki", "--calib-samples", "128", "--keep-rows", "32768",
        "--tune-blocks", "1"],
    "qswd 3.0 bits, calibrated on 128 windows, embedding d=4 k=256 + 32768 token rows kept in int8, tuned blocks": [
        "--method", "qswd", "--bits", "3.0", "--calib", "wiki", "--calib-samples", "128", "--keep-rows", "32768",
        "-L", r"model\.embed_tokens:dim=4,k=256,terms=1,coef_bits=0", "--tune-blocks", "1"],
    "qswd 3.0 bits, calibrated on 128 windows, embedding d=4 k=256 + 16384 token rows kept in int8, tuned blocks": [
        "--method", "qswd", "--bits", "3.0", "--calib", "wiki", "--calib-samples", "128", "--keep-rows", "16384",
        "-L", r"model\.embed_tokens:dim=4,k=256,terms=1,coef_bits=0", "--tune-blocks", "1"],
    "qswd 3.0 bits, calibrated on 128 windows, embedding d=4 k=256 + 22528 token rows kept in int8, tuned blocks": [
        "--method", "qswd", "--bits", "3.0", "--calib", "wiki", "--calib-samples", "128", "--keep-rows", "22528",
        "-L", r"model\.embed_tokens:dim=4,k=256,terms=1,coef_bits=0", "--tune-blocks", "1"],
    "kmeans 2 bits, row scales (data-free), Linear layers only (embedding dense)": [
        "--method", "kmeans", "--dim", "4", "--k", "256", "--scale", "row", "--skip", SKIP_EMBEDDING],
    "kmeans 2.1 bits per Linear layer, row scales, calibrated, Linear layers only (embedding dense)": [
        "--method", "kmeans", "--bits", "2.1", "--per-layer-bits", "--scale", "row", "--calib", "wiki",
        "--skip", SKIP_EMBEDDING],
    "jlcm 2.1 bits per Linear layer, Linear layers only (embedding dense)": [
        "--method", "jlcm", "--bits", "2.1", "--per-layer-bits", "--calib", "wiki", "--skip", SKIP_EMBEDDING],
    "kmeans 3.1 bits, row scales, calibrated, tuned blocks": ["--method", "kmeans", "--bits", "3.1", "--scale", "row",
                                                              "--calib", "wiki", "--tune-blocks", "2"],
    # beside llama.cpp's types (llamacpp.py): the token embedding at 8 bits as llama.cpp keeps it at Q8_0,
    # the Linear layers at or under its types' Linear bits
    "kmeans 3.6 bits per Linear layer, calibrated, embedding rtn 8 bits": [
        "--method", "kmeans", "--bits", "3.6", "--per-layer-bits", "--calib", "wiki", "-L", EMBEDDING_8_BITS],
    "kmeans 5.3 bits per Linear layer, calibrated, embedding rtn 8 bits": [
        "--method", "kmeans", "--bits", "5.3", "--per-layer-bits", "--calib", "wiki", "-L", EMBEDDING_8_BITS],
    "vq4all trellis 2.1 bits per Linear layer, rotated, calibrated on 128 windows, embedding rtn 8 bits, tuned blocks": [
        "--method", "vq4all", "-O", "codebook=trellis", "-O", "transform=hadamard", "--bits", "2.1",
        "--per-layer-bits", "--calib", "wiki", "--calib-samples", "128", "-L", EMBEDDING_8_BITS, "--tune-blocks", "2"],
    # what a user types: no flag but the method and the budget (the structure's defaults are said as it runs)
    "qswd 3 bits, the plain command": ["--method", "qswd", "--bits", "3"],
    "kmeans 3 bits, the plain command": ["--method", "kmeans", "--bits", "3"],
    "jlcm 3 bits, the plain command": ["--method", "jlcm", "--bits", "3"],
}
#: label → (the row whose file it starts from, the arguments after ``vqc finetune FILE``): that row's
#: file distilled further from the dense model, without fitting it again
FINETUNED = {
    "vq4all trellis 2.1 bits per Linear layer, rotated, calibrated on 128 windows, embedding rtn 8 bits, tuned blocks, "
    "then 48 distillation steps": (
        "vq4all trellis 2.1 bits per Linear layer, rotated, calibrated on 128 windows, embedding rtn 8 bits, tuned blocks",
        ["--steps", "48", "--lr", "1e-4", "--calib", "wiki", "--calib-samples", "1024"]),
    "qswd 3.0 bits, calibrated on 128 windows, embedding d=4 k=256 + 16384 token rows kept in int8, tuned blocks, "
    "then 48 distillation steps": (
        "qswd 3.0 bits, calibrated on 128 windows, embedding d=4 k=256 + 16384 token rows kept in int8, tuned blocks",
        ["--steps", "48", "--lr", "1e-4", "--calib", "wiki", "--calib-samples", "1024"]),
    "qswd 3.0 bits, calibrated on 128 windows, embedding d=4 k=256 + 22528 token rows kept in int8, tuned blocks, "
    "then 48 distillation steps": (
        "qswd 3.0 bits, calibrated on 128 windows, embedding d=4 k=256 + 22528 token rows kept in int8, tuned blocks",
        ["--steps", "48", "--lr", "1e-4", "--calib", "wiki", "--calib-samples", "1024"]),
}
#: label → a peer tool's settings. The peer codes every Linear layer of the blocks in place (HQQ
#: handles Linear layers only), the tied embedding and head stay dense: it stands beside the
#: "Linear layers only" rows above, whose files are written with the same layers dense.
PEERS = {
    "HQQ 2 bits, group 64": {"peer": "hqq", "nbits": 2, "group_size": 64},
    "HQQ 2 bits, group 128": {"peer": "hqq", "nbits": 2, "group_size": 128},
    "coremltools SKM 2 bits, one LUT per tensor": {"peer": "skm", "n_bits": 2},
}
DENSE_SCRIPT = ("import json; from vqcompress.models import load_model; from vqcompress.suites import run_suite; "
                "from vqcompress.speed import resident_bytes; model, source = load_model('gemma-270m'); "
                "print(json.dumps({**run_suite('gemma-270m', model, source.to_json(), 'cpu')['compressed'], "
                "'weight_bytes': resident_bytes(model)}))")
#: The suite's 2,048 tokens are its protocol (the reference figure), but a small sample: two files
#: whose 2,048-token perplexities differ by 3% differed by 13% on 16,384 tokens. So every row is
#: also scored on the first LONG_TOKENS tokens, by the same protocol.
LONG_TOKENS = 16384
LONG_SCRIPT = ("import sys, copy; from transformers import AutoTokenizer; from vqcompress.models import load_model, model_folder; "
               "from vqcompress.io import load; "
               "from vqcompress.suites.gemma import evaluate; "
               "model, source = load_model('gemma-270m'); "
               "model = model if sys.argv[1] == 'dense' else load(sys.argv[1], like=copy.deepcopy(model)); "
               "tokenizer = AutoTokenizer.from_pretrained(str(model_folder(source.to_json()))); "
               f"print(evaluate(model, tokenizer, tokens={LONG_TOKENS})['perplexity'])")


def vqc(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("vqc")), *args]


def bench_file(label: str) -> Path:
    """Where a configuration's file is kept (for `vqc inspect`; out/ is not in the repository)."""
    return LOGS / (re.sub(r"[^a-z0-9.]+", "-", label.lower()).strip("-") + ".vqc")


def long_perplexity(path: Path | None) -> float:
    """Perplexity of a file (or, with None, the dense model) on the first LONG_TOKENS tokens."""
    stdout, _, _ = run_measured([sys.executable, "-c", LONG_SCRIPT, str(path or "dense")])
    return float(stdout.strip().splitlines()[-1])


def linear_bits(coded_layers: list[dict]) -> float | None:
    """Bits per weight of the blocks' coded Linear layers (every coded layer but the token embedding and
    head), as llama.cpp's rows count theirs; None where none is coded."""
    linear = [layer for layer in coded_layers if not re.fullmatch(SKIP_EMBEDDING, layer["name"])]
    return sum(layer["bits"] for layer in linear) / sum(layer["weights"] for layer in linear) if linear else None


def measure(label: str, rows: dict[str, dict]) -> dict:
    """Compress as the configuration says, or fine-tune an earlier row's file (``FINETUNED``; its
    time and peak memory then add to that row's), timed, with its peak memory (its progress, with
    each tuned block's output error, goes to out/gemma-bench/), then score the file."""
    LOGS.mkdir(parents=True, exist_ok=True)
    path = bench_file(label)
    log = path.with_suffix(".log")
    if label in FINETUNED:
        base, extra = FINETUNED[label]
        if base not in rows or not bench_file(base).exists():
            raise SystemExit(f"{label!r} starts from the file of {base!r}: measure that row first")
        command, args = vqc("finetune", str(bench_file(base)), *extra), [*rows[base]["args"], "&&", "vqc", "finetune", "FILE", *extra]
    else:
        command, args = vqc("compress", "gemma-270m", *CONFIGS[label]), CONFIGS[label]
    stdout, seconds, peak = run_measured([*command, "-o", str(path), "--json"], log)
    written = json.loads(stdout)
    if label in FINETUNED:
        written |= {key: rows[base][key] for key in ("settings", "allocation")}
        seconds, peak = seconds + rows[base]["seconds"], max(peak, rows[base]["peak_memory_mib"])
    scored, _, _ = run_measured(vqc("eval", str(path), "--json"))
    figures = json.loads(scored)
    row = {"label": label, "args": args, "seconds": seconds, "peak_memory_mib": peak,
           "perplexity": figures["compressed"]["perplexity"], "perplexity_long": long_perplexity(path),
           "file_bytes": written["file_bytes"],
           "model_bits_per_weight": written["model_bits_per_weight"],
           "coded_bits_per_weight": written["coded_bits_per_weight"],
           "linear_bits_per_weight": linear_bits(written["coded_layers"]),
           "settings": written["settings"], "allocation": written["allocation"], "machine": machine(),
           "date": now()}
    print(f"{label:<58} {row['model_bits_per_weight']:.3f} bits/w  perplexity {row['perplexity']:.2f}  "
          f"({seconds:.0f} s, {peak:.0f} MiB)", file=sys.stderr, flush=True)
    return row


def measure_peer(label: str) -> dict:
    """A peer's row, from a fresh process (``--peer``): the peer's time and the process's peak
    memory up to the end of compression (load included, evaluation not), then perplexity."""
    stdout, _, _ = run_measured([sys.executable, "-m", "benchmarks.gemma", "--peer", json.dumps(PEERS[label])])
    row = {"label": label, **json.loads(stdout.strip().splitlines()[-1]), "machine": machine(), "date": now()}
    print(f"{label:<58} {row['coded_bits_per_weight']:.3f} bits/w coded  perplexity {row['perplexity']:.2f}  "
          f"({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return row


def run_peer(settings: dict) -> dict:
    """In this process: the peer applied to the dense model's block Linear layers, then scored."""
    import resource

    from torch import nn
    from transformers import AutoTokenizer

    from vqcompress.models import load_model, model_folder
    from vqcompress.suites.gemma import evaluate

    from . import peers

    model, source = load_model("gemma-270m")
    tokenizer = AutoTokenizer.from_pretrained(str(model_folder(source.to_json())))
    parameters = sum(p.numel() for p in model.parameters())  # the tied embedding once
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not re.fullmatch(SKIP_EMBEDDING, n)]
    if settings["peer"] == "hqq":
        result = peers.hqq_quantize(model, settings["nbits"], settings["group_size"], names)
    else:
        result = skm_on_windows(model, settings["n_bits"], names, source.to_json())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model_bits = result.compressed_bits + 32 * (parameters - result.n_weights)
    return {"args": [f"{key}={value}" for key, value in settings.items()], "seconds": result.seconds,
            "peak_memory_mib": peak, "coded_bits_per_weight": result.bits_per_weight,
            "model_bits_per_weight": model_bits / parameters, "layers": len(names),
            "perplexity": evaluate(model, tokenizer)["perplexity"],
            "perplexity_long": evaluate(model, tokenizer, tokens=LONG_TOKENS)["perplexity"]}


def skm_on_windows(model, n_bits: int, names: list[str], source: dict):
    """coremltools' SKMPalettizer as SqueezeLLM uses it on an LM: each weight's sensitivity is its
    squared gradient of the model's own next-token loss, summed over vqcompress's calibration
    windows (wiki, one 512-token window a sample)."""
    from vqcompress.data import training_data

    from . import peers

    data = training_data(source, 0, "wiki")
    samples = [{"input_ids": window[None]} for i in range(data.calibration_batches)
               for window in data.batch_at(i)["input_ids"]]

    def next_token_loss(module, sample: dict):
        return module(**sample, labels=sample["input_ids"], use_cache=False).loss

    result = peers.skm_palettize(model, n_bits, samples, next_token_loss, layer_names=names)
    result.settings["loss"] = "next-token cross-entropy"
    return result


def dense() -> dict:
    stdout, seconds, peak = run_measured([sys.executable, "-c", DENSE_SCRIPT])
    figures = json.loads(stdout.strip().splitlines()[-1])
    return {"perplexity": figures["perplexity"], "perplexity_long": long_perplexity(None),
            "weight_bytes": figures["weight_bytes"], "seconds": seconds, "machine": machine(), "date": now()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", metavar="LABEL_SUBSTRING", action="append",
                        help="measure only the configurations whose label contains this text, or only the one "
                             "it names exactly (repeatable), keeping the other rows")
    parser.add_argument("--list", action="store_true", help="print the configurations' labels and exit")
    parser.add_argument("--long", action="store_true", help=f"only score the kept files of the rows (and dense) "
                                                            f"on {LONG_TOKENS:,} tokens, compressing nothing")
    parser.add_argument("--peer", metavar="JSON", help=argparse.SUPPRESS)  # one peer row, in this process
    args = parser.parse_args()
    if args.peer:
        print(json.dumps(run_peer(json.loads(args.peer))))
        return
    if args.list:
        print("\n".join([*CONFIGS, *FINETUNED, *PEERS]))
        return
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:CORES])  # children inherit the pinning
    every = [*CONFIGS, *FINETUNED, *PEERS]
    labels = [label for label in every if not args.only
              or any(p == label or (p not in every and p in label) for p in args.only)]
    if not labels:
        raise SystemExit(f"no configuration matches {args.only}; see --list")
    result = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"suite": "gemma-270m", "rows": []}
    if args.long:
        score_long(result, labels)
        return
    result["dense"] = dense()
    write_json(RESULTS, result)
    for label in labels:
        table = "peers" if label in PEERS else "rows"
        kept = {r["label"]: r for r in result.get(table, [])}
        rows = kept | {label: measure_peer(label) if label in PEERS else measure(label, kept)}
        result[table] = [rows[name] for name in (PEERS if label in PEERS else [*CONFIGS, *FINETUNED]) if name in rows]
        result["updated"] = now()
        write_json(RESULTS, result)
    render.main()


def score_long(result: dict, labels: list[str]) -> None:
    """Add the LONG_TOKENS perplexity to the dense model and to the rows of ``labels`` whose files
    are kept (rows measured before it existed)."""
    result["dense"]["perplexity_long"] = long_perplexity(None)
    for row in result["rows"]:
        if row["label"] in labels and bench_file(row["label"]).exists():
            row["perplexity_long"] = long_perplexity(bench_file(row["label"]))
            print(f"{row['label']:<58} {LONG_TOKENS:,} tokens: {row['perplexity_long']:.2f}", file=sys.stderr, flush=True)
    write_json(RESULTS, result)
    render.main()


if __name__ == "__main__":
    main()
