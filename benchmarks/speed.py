"""`make bench-speed`: coded layers on their default forward path against dense fp32 and the decode
path, on one big layer and on Gemma-270M generating text; once as the machine is, once with every
core taken by another process.

    .venv/bin/python -m benchmarks.speed                  # about 10 minutes on 2 cores
    .venv/bin/python -m benchmarks.speed --device cuda    # the same on a GPU (pure-torch coded path)
    .venv/bin/python -m benchmarks.speed --layer e8p --skip-gemma   # E8P on rotated weights (speed-e8p.json)

Layer: ``vqc.compress(nn.Linear(4096, 4096), method="kmeans", bits=2)`` and nothing else (no
``set_forward_path``), at batch 1 and 64; the variants called in turn within each round, so that a
change of load on a shared machine hits them alike; median of the rounds:

- dense: the ``nn.Linear`` it was made from (fp32);
- default path: the coded layer as ``compress`` returns it ("auto": on the CPU the compiled kernel,
  choosing the table or decode-then-multiply by its cost model);
- kernel, table / gather / decode-then-multiply: the kernel's ways forced (CPU; the gather at d = 8,
  the tables only for small codebooks);
- decode path: ``set_forward_path("decode")`` (torch decodes the weight, then ``F.linear``);
- torch table product: the "lut" path without the compiled kernel (the pure-torch table and gather).

Gemma-270M: kmeans at d = 4, k = 256 with row scales (``vqc compress gemma-270m --method kmeans
--dim 4 --k 256 --scale row``), the dense fp32 model against the .vqc as ``load`` gives it; greedy
generation with the KV cache, batch 1, the two models in turn, median tokens per second; and the
bytes of weights each holds.

Conditions, in one process: "quiet" (the machine as it is: its load average and the cores other
processes kept busy meanwhile are recorded, since the machine may be shared) and "cores busy": one
``while True: pass`` process per core started before and stopped after. Results:
benchmarks/results/speed.json, rendered by render.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .run import ROOT, machine, now, write_json

RESULTS = ROOT / "benchmarks" / "results" / "speed.json"
SIDE, BITS = 4096, 2
#: the layers ``--layer`` times: the plain call, and E8P on rotated weights (the kernel's gather)
LAYERS = {"kmeans": {"method": "kmeans", "bits": BITS},
          "e8p": {"method": "vq4all", "bits": BITS + 0.01, "codebook": "e8p", "transform": "hadamard"}}
BATCHES = (1, 64)
REPEATS = 20
GEMMA_SETTINGS = ["--method", "kmeans", "--dim", "4", "--k", "256", "--scale", "row"]
NEW_TOKENS, GENERATIONS = 32, 5


def rounds(variants: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None]) -> dict[str, float]:
    """Median milliseconds of each variant, all called once per round (after two warm-up rounds)."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for round_ in range(2 + repeats):
            for name, call in variants.items():
                start = time.perf_counter()
                call()
                sync()
                if round_ >= 2:
                    times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def plain_layer(device: str, settings: dict):
    """(dense Linear, the coded layer ``compress`` makes of it with ``settings``), on ``device``."""
    import torch

    import vqcompress as vqc

    torch.manual_seed(0)
    dense = torch.nn.Linear(SIDE, SIDE)
    coded = vqc.compress(dense, progress=False, **settings)  # a new layer: ``dense`` stays as it was
    return dense.to(device), coded.to(device)


def layer_bench(dense, coded, device: str, repeats: int) -> list[dict]:
    import torch

    from vqcompress import kernels

    g = torch.Generator().manual_seed(1)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def path(forward: str, kernel: str | None = None) -> Callable[[], object]:
        """The coded layer on ``forward``, the kernel's way ``forced`` when given; back to "auto" after."""
        def call():
            coded.set_forward_path(forward)
            with kernels.forced(kernel) if kernel else contextlib.nullcontext():
                out = coded(x)
            coded.set_forward_path("auto")
            return out
        return call

    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, SIDE, generator=g).to(device)
        variants = {"dense": lambda: dense(x), "default path": lambda: coded(x), "decode path": path("decode")}
        small_table = coded.weight_code.layout.k <= 4096  # a table of 2^16 codewords per segment: minutes, GiB
        if small_table:
            variants["torch table product"] = path("lut", "torch")
        if device == "cpu":
            variants |= ({"kernel, table": path("lut", "table")} if small_table else {}) | (
                {"kernel, gather": path("lut", "gather")} if coded.weight_code.layout.dim == 8 else {}) | {
                "kernel, decode-then-multiply": path("lut", "decode")}
        with torch.no_grad():
            expected = path("decode")()
            for name, call in variants.items():
                if name != "dense":  # the coded ones compute one function; dense has the original weight
                    torch.testing.assert_close(call(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
        rows.append({"batch": batch, "ms": rounds(variants, repeats, sync)})
        print(f"  batch {batch}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in rows[-1]["ms"].items()), flush=True)
    return rows


def gemma_file(path: Path | None) -> Path:
    """The 2-bit Gemma file: the one given, else compressed once and kept beside the results."""
    if path is not None:
        return path
    path = ROOT / "out" / "gemma-270m-2bit-d4k256.vqc"
    if not path.exists():
        subprocess.run([sys.executable, "-m", "vqcompress", "compress", "gemma-270m", *GEMMA_SETTINGS, "-o", str(path),
                        "--quiet"], check=True)
    return path


def gemma_models(path: Path, device: str):
    """(dense fp32 Gemma-270M, the coded file as ``load`` gives it)."""
    from vqcompress import load
    from vqcompress.models import load_model

    return load_model("gemma-270m")[0].float().eval().to(device), load(path, device=device)


def gemma_bench(dense, coded, device: str, generations: int) -> dict:
    from vqcompress.speed import prompt_ids, tokens_per_second

    ids = prompt_ids(coded).to(device)
    speeds: dict[str, list[float]] = {"dense": [], "coded": []}
    for _ in range(generations):  # in turn, one generation each, so that both see the same load
        for name, model in (("dense", dense), ("coded", coded)):
            speeds[name].append(tokens_per_second(model, ids, NEW_TOKENS, 1))
    print(f"  Gemma: dense {statistics.median(speeds['dense']):.2f}, coded {statistics.median(speeds['coded']):.2f} "
          "tokens/s", flush=True)
    return {"prompt_tokens": ids.shape[1], "dense_tokens_per_s": statistics.median(speeds["dense"]),
            "coded_tokens_per_s": statistics.median(speeds["coded"])}


@contextlib.contextmanager
def busy_cores(count: int) -> Iterator[None]:
    """``count`` processes that spin on a core each for the duration of the block."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(2)  # running, and seen by the kernel's look at the cores
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def others_busy(since: tuple[float, float, float], cpus: set[int]) -> float | None:
    """Cores kept busy by other processes since ``since`` (wall clock, busy CPU seconds, this process's)."""
    from vqcompress import kernels

    busy = kernels.busy_seconds(cpus)
    if busy is None:
        return None
    return (busy - since[1] - (time.process_time() - since[2])) / (time.monotonic() - since[0])


def condition(name: str, spinners: int, run: Callable[[], dict]) -> dict:
    """One condition's figures, with the load it ran under."""
    from vqcompress import kernels

    print(f"{name} (load average {os.getloadavg()[0]:.2f}):", flush=True)
    cpus = os.sched_getaffinity(0)
    with busy_cores(spinners):
        load = os.getloadavg()[0]
        since = (time.monotonic(), kernels.busy_seconds(cpus) or 0.0, time.process_time())
        figures = run()
        return {"name": name, "spinners": spinners, "load_average": load,
                "others_busy_cores": others_busy(since, cpus), "kernel_threads": kernels.threads()} | figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--generations", type=int, default=GENERATIONS)
    parser.add_argument("--gemma-file", type=Path, help="a compressed Gemma-270M (default: compressed once to out/)")
    parser.add_argument("--skip-gemma", action="store_true")
    parser.add_argument("--quiet-only", action="store_true", help="no run with the cores taken")
    parser.add_argument("--threads", type=int, help="CPU threads for dense and coded alike (default: torch's)")
    parser.add_argument("--layer", choices=sorted(LAYERS), default="kmeans", help="the 4096 × 4096 layer's coding")
    parser.add_argument("--output", type=Path, help="default: results/speed.json (speed-e8p.json for --layer e8p)")
    args = parser.parse_args()

    import torch

    from vqcompress import kernels
    from vqcompress.report import report
    from vqcompress.speed import resident_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    started, load_before = now(), os.getloadavg()
    settings = LAYERS[args.layer]
    output = args.output or (RESULTS if args.layer == "kmeans" else RESULTS.with_name(f"speed-{args.layer}.json"))
    dense, coded = plain_layer(args.device, settings)
    layout = coded.weight_code.layout
    gemma = None if args.skip_gemma else gemma_file(args.gemma_file)
    models = None if gemma is None else gemma_models(gemma, args.device)

    def run() -> dict:
        figures = {"layer": layer_bench(dense, coded, args.device, args.repeats)}
        return figures | ({} if models is None else {"gemma": gemma_bench(*models, args.device, args.generations)})

    spinners = [0] if args.quiet_only else [0, len(os.sched_getaffinity(0))]
    conditions = [condition("quiet" if n == 0 else f"{n} cores busy", n, run) for n in spinners]
    result = {"started": started, "load_averages_before": load_before,
              "machine": machine() | {"threads": torch.get_num_threads()}, "device": args.device,
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "backend": kernels.backend() if args.device == "cpu" else "pure torch on CUDA (no compiled kernel)",
              "layer": {"call": f"`compress(nn.Linear({SIDE}, {SIDE}), "
                                + ", ".join(f"{key}={value!r}" for key, value in settings.items()) + ")`",
                        "shape": list(layout.shape), "dim": layout.dim, "k": layout.k,
                        "bits_per_weight": coded.weight_code.nbits() / layout.rows / layout.cols,
                        "repeats": args.repeats},
              "conditions": conditions}
    if gemma is not None:
        figures = report(gemma).to_json()
        result["gemma"] = {"file": str(gemma), "settings": " ".join(GEMMA_SETTINGS), "new_tokens": NEW_TOKENS,
                           "path": "as `load` gives it (the default path)",
                           "generations": args.generations, "model_bits_per_weight": figures["model_bits_per_weight"],
                           "coded_bits_per_weight": figures["coded_bits_per_weight"],
                           "dense_weight_bytes": resident_bytes(models[0]),
                           "coded_weight_bytes": resident_bytes(models[1])}
    result["finished"], result["load_averages_after"] = now(), os.getloadavg()
    write_json(output, result)
    print(json.dumps(result, indent=1))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
