"""`make bench-fashion`: the fashion-cnn and fashion-vit suites, the resume check, and the FLOP/time table.

    .venv/bin/python -m benchmarks.fashion          # from the repository root; about 2.5 h on 2 idle cores
                                                    # (19 of the 24 accuracy rows took 108 min of training)

Accuracy: every Conv2d and Linear of each zoo model is coded (the first and the last layer, a
tiny share of the weights, at 4 bits, as quantization papers keep them at 8), at two budgets
(≤ 1.6 and ≤ 1.0 bits per weight over all those layers, everything counted), by kmeans alone,
kmeans + the fine-tuning engine, vqdnn, and coremltools' DKMPalettizer with the same layers,
the same steps and the same loss. Ours are scored on the model reloaded from its .vqc file.

Resume: `vqc compress … --finetune-steps` interrupted by SIGINT, run again, compared with an
uninterrupted run (file sha256 and accuracy). FLOPs: every coded layer, dense vs lookup table,
beside measured times of the dense layer, the decode path and the lookup-table path.
Results go to benchmarks/results/fashion.json; benchmarks/render.py puts them into docs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .run import CORES, ROOT, machine, now, write_json

RESULTS = ROOT / "benchmarks" / "results" / "fashion.json"
MODELS = {"fashion-cnn": ("features.0.0", "head.5"), "fashion-vit": ("patch", "head")}  # (first, last) layer
EDGE_SPEC = {"dim": 1, "k": 16}  # the first and last layer: 4-bit scalar codebooks
# Index bits per budget (what the coded total then comes to is measured from the file), and DKM's
# (n_bits, cluster_dim) giving about the same index bits.
BUDGETS = {
    "fashion-cnn": {"≤ 1.6": {"bits": 1.5, "dkm": (3, 2)}, "≤ 1.0": {"bits": 0.875, "dkm": (7, 8)}},
    "fashion-vit": {"≤ 1.6": {"bits": 1.5, "dkm": (3, 2)}, "≤ 1.0": {"bits": 0.75, "dkm": (3, 4)}},
}
# Per-row fp16 scales pay in the CNN (BatchNorm renormalises every output channel, so each row's own
# error is what counts; 0.005 bits/w on its big Linear) but would cost 0.25 bits/w on the ViT's
# 64-input rows, which instead share one codebook (with a per-layer gain) so that it can be large.
MODEL_OPTIONS = {"fashion-cnn": {"scale": "row"}, "fashion-vit": {"shared": 1}}
STEPS = 4000
DKM_STEPS = 1000
# The rate–distortion curve (fashion-cnn, no training; the first and last layer by kmeans' 4-bit
# scalar codebooks for every method): each method's budgets from 0.5 to 6 bits per weight.
RATES = {"qswd": (0.6, 0.85, 1.1, 1.6, 2.1, 3.1, 4.1, 5.1, 6.1), "kmeans": (0.5, 1, 1.5, 2, 3, 4, 6),
         "rtn": (1, 2, 3, 4), "jlcm": (1.25, 2.1, 3.1, 4.1, 6.1)}  # jlcm: 1.21 is its least here
# qswd's whole pipeline at the low end (is it usable at 0.5–1 bit?): fitted on the calibration
# images' statistics, then fine-tuned end to end with positions fixed, RATE_STEPS steps.
TUNED_RATES = {"qswd": (0.6, 0.85, 1.1)}
RATE_STEPS = 1000
RTN_GROUP = 16  # the largest group dividing every coded layer's inputs (144, 288, 3136): 2 bits of scales
LR = {"kmeans": 1e-4, "vqdnn": 1e-4, "dkm": 1e-4}
BATCHES = (1, 8, 64)
REPEATS = 15
RESUME_STEPS = 300


def plan_for(model_name: str, edge_method: str | None = None, inner: dict | None = None):
    """Every layer by the method under test (with the ``inner`` options), but the first and last
    at 4-bit scalar codebooks (by ``edge_method`` where given: the rate–distortion rows keep them
    alike for every method)."""
    from vqcompress.plan import Plan

    first, last = MODELS[model_name]
    edge = dict(EDGE_SPEC) | ({"method": edge_method} if edge_method else {})
    edges = "|".join(re.escape(name) for name in (first, last))
    return Plan(by_name={".*": {}, f"(?!({edges})$).*": dict(inner or {}), **{name: dict(edge) for name in (first, last)}})


def training_batches(device: str):
    """Fashion-MNIST training batches (the engine's own, seed 0) on ``device``."""
    from vqcompress.data import fashion_training_data
    from vqcompress.finetune import TrainingData

    data = fashion_training_data(0)
    return TrainingData(data.task, lambda step: tuple(t.to(device) for t in data.batch_at(step)))


def run_fp32(model_name: str, device: str) -> dict:
    from vqcompress.models import load_model
    from vqcompress.models.fashion import accuracy

    model, _ = load_model(model_name)
    return {"accuracy": 100 * accuracy(model.to(device), device), "coded_bits_per_weight": 32.0,
            "model_bits_per_weight": 32.0, "parameters": sum(p.numel() for p in model.parameters())}


def run_ours(model_name: str, method: str, bits: float, steps: int, device: str, assignments: str = "ste",
             edge_method: str | None = None, calibrate: bool | None = None, allocation: bool = True) -> dict:
    """Compress with vqcompress, write the file, reload it (on CPU), score it. jlcm always learns
    on the training images; the model's options are kmeans' (and vqdnn's, which starts from it);
    ``calibrate`` and ``allocation`` as in ``vqcompress.compress`` (fine-tuned rows fit without
    statistics unless True; without allocation ``bits`` is each layer's ceiling, as in the
    data-free rows)."""
    import vqcompress as vqc
    from vqcompress.budget import PerLayer
    from vqcompress.models import load_model
    from vqcompress.models.fashion import accuracy

    model, _ = load_model(model_name)
    start = time.perf_counter()
    calibrated = bool(steps) or method == "jlcm"
    options = MODEL_OPTIONS[model_name] if method in ("kmeans", "vqdnn") else {}
    inner = {"group_size": RTN_GROUP} if method == "rtn" else {}
    vqc.compress(model.to(device), method, bits=bits if allocation else PerLayer(bits),
                 plan=plan_for(model_name, edge_method, inner), progress=False,
                 finetune_steps=steps, calibration=training_batches(device) if calibrated else None,
                 finetune_lr=LR.get(method, LR["kmeans"]), assignments=assignments, calibrate=calibrate, **options)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "model.vqc"
        vqc.save(model, path)
        report = vqc.report(path)
        reloaded = vqc.load(path, like=load_model(model_name)[0])
    per_layer = {r.name: round(r.bits_per_weight, 3) for r in report.coded}
    return {"coded_bits_per_weight": report.coded_bits_per_weight, "model_bits_per_weight": report.model_bits_per_weight,
            "file_bytes": report.file_bytes, "layers": len(report.coded), "layer_bits": per_layer,
            "accuracy": 100 * accuracy(reloaded), "seconds": seconds}


def run_dkm(model_name: str, n_bits: int, cluster_dim: int, steps: int, device: str) -> dict:
    """coremltools DKM on the same layers (first and last at 4-bit scalar LUTs), same data and loss."""
    from torch import nn

    from vqcompress.models import load_model
    from vqcompress.models.fashion import accuracy

    from . import peers

    model, _ = load_model(model_name)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    edges = {name: (4, 1) for name in MODELS[model_name]}
    result = peers.dkm_palettize(model.to(device), n_bits, steps, training_batches(device).batch_at, lr=LR["dkm"],
                                 cluster_dim=cluster_dim, layer_names=names, overrides=edges)
    parameters = sum(p.numel() for p in result.model.parameters())
    return {"coded_bits_per_weight": result.bits_per_weight,
            "model_bits_per_weight": (result.compressed_bits + 32 * (parameters - result.n_weights)) / parameters,
            "file_bytes": None, "layers": len(result.settings["layers"]), "skipped": result.settings["skipped"],
            "accuracy": 100 * accuracy(result.model, device), "seconds": result.seconds}


def accuracy_configs() -> list[dict]:
    configs = []
    for model_name, budgets in BUDGETS.items():
        configs.append({"model": model_name, "budget": "fp32", "method": "fp32", "steps": 0})
        for budget, setting in budgets.items():
            configs += [{"model": model_name, "budget": budget, "method": method, "steps": steps, "bits": setting["bits"]}
                        for method, steps in (("kmeans", 0), ("kmeans", STEPS), ("vqdnn", STEPS))]
            configs.append({"model": model_name, "budget": budget, "method": "vqdnn", "steps": STEPS,
                            "bits": setting["bits"], "assignments": "soft"})
            n_bits, cluster_dim = setting["dkm"]
            configs.append({"model": model_name, "budget": budget, "method": "coremltools-dkm", "steps": DKM_STEPS,
                            "n_bits": n_bits, "cluster_dim": cluster_dim})
    return configs


def rate_configs() -> list[dict]:
    """The rate–distortion rows: fashion-cnn by each method at each budget, no training; then
    qswd calibrated and fine-tuned at the low budgets."""
    return [*({"model": "fashion-cnn", "budget": "rate", "method": method, "steps": 0, "bits": bits}
              for method, rates in RATES.items() for bits in rates),
            *({"model": "fashion-cnn", "budget": "rate", "method": method, "steps": RATE_STEPS, "bits": bits,
               "calibrate": True, "allocation": False} for method, rates in TUNED_RATES.items() for bits in rates)]


def measure(config: dict, device: str) -> dict:
    """One accuracy configuration (in a child process of its own)."""
    import torch

    torch.set_num_threads(CORES)
    model, method, steps = config["model"], config["method"], config["steps"]
    if method == "fp32":
        row = run_fp32(model, device)
    elif method == "coremltools-dkm":
        row = run_dkm(model, config["n_bits"], config["cluster_dim"], steps, device)
    else:
        row = run_ours(model, method, config["bits"], steps, device, config.get("assignments", "ste"),
                       "kmeans" if config["budget"] == "rate" else None, config.get("calibrate"),
                       config.get("allocation", True))
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else None
    return {**config, **row, "zoo": zoo_build(model), "device": device, "gpu": gpu, "machine": machine(), "date": now()}


def same_config(row: dict, config: dict) -> bool:
    """``row`` measured ``config`` (rows from before soft assignments existed have no such key)."""
    return all(row.get(key) == value for key, value in config.items()) and row.get("assignments") == config.get("assignments")


def zoo_build(model_name: str) -> str | None:
    """The zoo checkpoint's sha256 (12 hex digits; None before it is trained). One seed trains the
    same weights on one CPU family, but another rounds differently: rows say which build they measured."""
    from vqcompress.models.fashion import checkpoint_path

    path = checkpoint_path(model_name, 0)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.exists() else None


def accuracy_rows(configs: list[dict], device: str = "cpu", jobs: int = 1, earlier: list[dict] | None = None,
                  keep: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    """Each configuration in a fresh process, ``jobs`` at a time (where a GPU has room for several).
    Rows in ``earlier`` stay; a configuration with a row there for the zoo build at hand is not
    measured again. ``keep`` gets all rows after each new one, so an interrupt loses one row at most."""
    from concurrent.futures import ThreadPoolExecutor

    rows, lock = list(earlier or []), threading.Lock()
    builds = {config["model"]: zoo_build(config["model"]) for config in configs}
    todo = [c for c in configs if not any(same_config(r, c) and r.get("zoo") == builds[c["model"]] for r in rows)]

    def child(config: dict) -> None:
        argv = [sys.executable, "-m", "benchmarks.fashion", "--one", json.dumps(config), "--device", device]
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{config} failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        log(row)
        with lock:
            rows.append(row)
            keep(rows)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(child, todo))
    return rows


def log(row: dict) -> None:
    print(f"{row['model']:<12} {row['budget']:<6} {row['method']:<16} steps {row['steps']:>5}  "
          f"{row['coded_bits_per_weight']:.3f} bits/w  acc {row['accuracy']:.2f}", file=sys.stderr, flush=True)


# --- resume: a real interrupted CLI run ---------------------------------------------------------

def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def resume_check() -> dict:
    """Run `vqc compress fashion-cnn --method vqdnn` uninterrupted; then again, SIGINT once its
    first checkpoint exists, and once more to resume. Same seed: same file and accuracy expected."""
    vqc = str(Path(sys.executable).with_name("vqc"))
    with tempfile.TemporaryDirectory() as workdir:
        whole, resumed = Path(workdir) / "whole.vqc", Path(workdir) / "resumed.vqc"
        argv = [vqc, "compress", "fashion-cnn", "--method", "vqdnn", "--bits", "1.5", "--finetune-steps",
                str(RESUME_STEPS), "--quiet"]
        subprocess.run([*argv, "-o", str(whole)], check=True, capture_output=True)
        checkpoint = resumed.with_name(f".{resumed.name}.partial.finetune")
        process = subprocess.Popen([*argv, "-o", str(resumed)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while not checkpoint.exists() and process.poll() is None:
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        interrupted = {"exit_code": process.wait(), "message": process.stderr.read().decode().strip()[-300:],
                       "file_written": resumed.exists(), "checkpoint_kept": checkpoint.exists()}
        subprocess.run([*argv, "-o", str(resumed)], check=True, capture_output=True)
        scores = {name: _file_accuracy(path) for name, path in (("uninterrupted", whole), ("resumed", resumed))}
        return {"command": " ".join(["vqc", *argv[1:], "-o", "OUT.vqc"]), "interrupted": interrupted,
                "same_file": sha256(whole) == sha256(resumed), "accuracy": scores}


def _file_accuracy(path: Path) -> float:
    import vqcompress as vqc
    from vqcompress.models.fashion import accuracy

    return 100 * accuracy(vqc.load(path))


# --- FLOPs and measured time per layer ----------------------------------------------------------

def layer_inputs(model, names: list[str], batch: int):
    """What each named layer sees when the model runs on ``batch`` test images."""
    import torch

    from vqcompress.models.fashion import load_split

    images, _ = load_split("test")
    inputs = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, args, n=n: inputs.__setitem__(n, args[0]))
             for n in names]
    with torch.no_grad():
        model(images[:batch])
    for hook in hooks:
        hook.remove()
    return inputs


def median_seconds(call, repeats: int = REPEATS) -> float:
    import torch

    with torch.no_grad():
        call()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def positions(layer, x) -> int:
    """Input vectors one call multiplies: tokens for a Linear, output pixels for a convolution."""
    from vqcompress.layers import CodedLinear

    if isinstance(layer, CodedLinear):
        return x.numel() // x.shape[-1]
    out = layer(x)
    return x.shape[0] * out.shape[-1] * out.shape[-2]


# The factor form's FLOPs and times: fashion-cnn coded by qswd with two weighted terms per
# sub-vector (d = 4, k = 16, 2-bit coefficients: 4 bits per weight), first and last layer as above.
FACTOR_FORM = {"dim": 4, "k": 16, "terms": 2, "coef_bits": 2}


def flop_rows() -> list[dict]:
    """Every coded layer at the ≤ 1.6 budget (kmeans: the layout is what counts), and fashion-cnn
    in the factor form (qswd), batch 1, 8, 64."""
    import copy

    import vqcompress as vqc
    from vqcompress.models import load_model

    rows = []
    for model_name in MODELS:
        dense, _ = load_model(model_name)
        coded = vqc.compress(copy.deepcopy(dense), "kmeans", bits=BUDGETS[model_name]["≤ 1.6"]["bits"],
                             plan=plan_for(model_name), progress=False, **MODEL_OPTIONS[model_name])
        rows += _timed_layers(model_name, "kmeans", dense, coded)
    dense, _ = load_model("fashion-cnn")
    factored = vqc.compress(copy.deepcopy(dense), "qswd", plan=plan_for("fashion-cnn", "kmeans"), progress=False,
                            **FACTOR_FORM)
    return rows + _timed_layers("fashion-cnn", "qswd", dense, factored)


def _timed_layers(model_name: str, method: str, dense, coded) -> list[dict]:
    """FLOPs and median times (dense layer, decode path, lookup-table path) of every coded layer."""
    from vqcompress.flops import layer_flops
    from vqcompress.layers import iter_coded

    rows, layers = [], dict(iter_coded(coded))
    for batch in BATCHES:
        inputs = layer_inputs(dense, list(layers), batch)
        for name, layer in layers.items():
            x, lay = inputs[name], layer.weight_code.layout
            flops = layer_flops(layer, positions(layer, x))
            times = {"dense": median_seconds(lambda: dense.get_submodule(name)(x))}
            for path in ("decode", "lut"):
                layer.set_forward_path(path)
                times[path] = median_seconds(lambda: layer(x))
            rows.append({"model": model_name, "method": method, "layer": name, "batch": batch, "shape": list(lay.shape),
                         "k": lay.k, "dim": lay.dim, "form": lay.describe_form(), **flops.to_json(),
                         **{f"{p}_ms": 1000 * s for p, s in times.items()}})
    print(f"{model_name}, {method}: FLOPs and times of {len(layers)} layers", file=sys.stderr, flush=True)
    return rows


PARTS = ("flops", "resume", "rows", "rate")


def selected(models: list[str] | None, budgets: list[str] | None) -> list[dict]:
    """The accuracy configurations of the given models and budgets (all where none are given)."""
    return [c for c in accuracy_configs() if (not models or c["model"] in models) and (not budgets or c["budget"] in budgets)]


def main() -> None:
    import argparse

    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=PARTS, help="re-measure one part, keep the others from the last run")
    parser.add_argument("--device", default="cpu", help="where the accuracy runs train (cuda when there is one)")
    parser.add_argument("--jobs", type=int, default=1, help="accuracy runs at a time, each its own process")
    parser.add_argument("--missing", action="store_true", help="with --only rows|rate: keep the last run's rows and "
                        "measure only configurations without one for the zoo build at hand")
    parser.add_argument("--model", action="append", help="accuracy rows of this model only (repeatable)")
    parser.add_argument("--budget", action="append", help="accuracy rows of this budget only, e.g. fp32 or '≤ 1.6'")
    parser.add_argument("--one", metavar="CONFIG_JSON", help="measure one accuracy configuration (internal)")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one), args.device)))
        return
    if args.device == "cpu":
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:CORES])
    torch.set_num_threads(CORES)
    result = json.loads(RESULTS.read_text()) if args.only and RESULTS.exists() else {}
    start = time.perf_counter()
    parts = [args.only] if args.only else PARTS
    if "flops" in parts:  # the machine the times were measured on; accuracy rows name their own
        result["machine"] = machine()
    result.update({"suite": "fashion", "steps": STEPS, "dkm_steps": DKM_STEPS, "lr": LR,
                   "model_options": MODEL_OPTIONS, "budgets": BUDGETS, "edge_spec": EDGE_SPEC, "edge_layers": MODELS})
    def rows_of(part: str, configs: list[dict]) -> Callable[[], list[dict]]:
        earlier = result.get(part) if args.missing else None
        return lambda: accuracy_rows(configs, args.device, args.jobs, earlier,
                                     keep=lambda rows: write_json(RESULTS, {**result, part: rows}))

    measure_part = {"flops": flop_rows, "resume": resume_check,
                    "rows": rows_of("rows", selected(args.model, args.budget)), "rate": rows_of("rate", rate_configs())}
    for part in parts:
        result.setdefault("measured", {})[part] = now()
        result[part] = measure_part[part]()
    result.setdefault("started", min(result["measured"].values()))
    before = result.get("seconds", 0) if args.only else 0  # a re-measured part adds to the run it joins
    result["seconds"] = before + time.perf_counter() - start
    write_json(RESULTS, result)
    from . import render

    render.main()


if __name__ == "__main__":
    main()
