"""`make bench-speed`: the compiled lookup-table kernel against dense fp32, on one big layer and on
Gemma-270M generating text.

    .venv/bin/python -m benchmarks.speed                  # about 5 minutes on 2 idle cores
    .venv/bin/python -m benchmarks.speed --device cuda    # the same on a GPU (pure-torch coded path)

Layer: a 4096 × 4096 Linear coded at 2 bits per weight (d = 4, k = 256, 8-bit codes, an fp16 scale
per row), random codes; at batch 1 and 64, in one process, the variants called in turn within each
round so that a change of load on a shared machine hits them alike; median of the rounds:

- dense: ``torch.nn.Linear`` with the decoded fp32 weight;
- kernel: the coded layer's "lut" path as it runs (the compiled kernel, choosing the table or
  decode-then-multiply by its cost model), and each of the two forced;
- decode path: the coded layer's "decode" path (torch decodes the weight, then ``F.linear``);
- torch fallback: the "lut" path with ``VQC_KERNEL=torch`` (the pure-torch table and gather).

Gemma-270M: kmeans at d = 4, k = 256 with row scales (``vqc compress gemma-270m --method kmeans
--dim 4 --k 256 --scale row``), the dense fp32 model against the .vqc reloaded with the "lut" path;
greedy generation with the KV cache, batch 1, the two models in turn, median tokens per second; and
the bytes of weights each holds. Results: benchmarks/results/speed.json, rendered by render.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from .run import ROOT, machine, now, write_json

RESULTS = ROOT / "benchmarks" / "results" / "speed.json"
SIDE, DIM, K = 4096, 4, 256
BATCHES = (1, 64)
REPEATS = 20
GEMMA_SETTINGS = ["--method", "kmeans", "--dim", str(DIM), "--k", str(K), "--scale", "row"]
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


def layer_bench(device: str, repeats: int) -> list[dict]:
    import torch

    from vqcompress import kernels
    from vqcompress.coded import CodedWeight, CodeLayout
    from vqcompress.layers import coded_from_dense

    g = torch.Generator().manual_seed(0)
    layout = CodeLayout((SIDE, SIDE), k=K, dim=DIM, scale_group=SIDE)
    code = CodedWeight.encode(layout, torch.randn(1, K, DIM, generator=g) * 0.02,
                              torch.randint(0, K, (SIDE, SIDE // DIM), generator=g), torch.rand(SIDE, 1, generator=g) + 0.5)
    dense = torch.nn.Linear(SIDE, SIDE, bias=False)
    dense.weight = torch.nn.Parameter(code.decode())
    coded = coded_from_dense(dense, code)
    dense, coded = dense.to(device), coded.to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def path(forward: str, kernel: str | None = None) -> Callable[[], object]:
        """The coded layer's ``forward`` path, with the kernel's choice ``forced`` when given."""
        def call():
            coded.set_forward_path(forward)
            with kernels.forced(kernel) if kernel else contextlib.nullcontext():
                return coded(x)
        return call

    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, SIDE, generator=g).to(device)
        variants = {"dense": lambda: dense(x), "kernel": path("lut"), "decode path": path("decode"),
                    "torch fallback": path("lut", "torch")}
        if device == "cpu":
            variants |= {"kernel, table": path("lut", "table"), "kernel, decode-then-multiply": path("lut", "decode")}
        with torch.no_grad():
            expected = dense(x)
            for name, call in variants.items():
                torch.testing.assert_close(call(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
        rows.append({"batch": batch, "ms": rounds(variants, repeats, sync)})
        print(f"batch {batch}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in rows[-1]["ms"].items()), flush=True)
    return rows


def gemma_file(path: Path | None) -> Path:
    """The 2-bit Gemma file: the one given, else compressed once and kept beside the results."""
    import subprocess
    import sys

    if path is not None:
        return path
    path = ROOT / "out" / "gemma-270m-2bit-d4k256.vqc"
    if not path.exists():
        subprocess.run([sys.executable, "-m", "vqcompress", "compress", "gemma-270m", *GEMMA_SETTINGS, "-o", str(path),
                        "--quiet"], check=True)
    return path


def gemma_bench(path: Path, device: str, generations: int) -> dict:
    import torch

    from vqcompress import load
    from vqcompress.layers import set_forward_path
    from vqcompress.models import load_model
    from vqcompress.report import report
    from vqcompress.speed import prompt_ids, resident_bytes, tokens_per_second

    dense = load_model("gemma-270m")[0].float().eval().to(device)
    coded = load(path, device=device)
    set_forward_path(coded, "lut")
    ids = prompt_ids(coded).to(device)
    speeds: dict[str, list[float]] = {"dense": [], "coded": []}
    for _ in range(generations):  # in turn, one generation each, so that both see the same load
        for name, model in (("dense", dense), ("coded", coded)):
            speeds[name].append(tokens_per_second(model, ids, NEW_TOKENS, 1))
    figures = report(path).to_json()
    return {"file": str(path), "settings": " ".join(GEMMA_SETTINGS), "prompt_tokens": ids.shape[1],
            "new_tokens": NEW_TOKENS, "generations": generations,
            "model_bits_per_weight": figures["model_bits_per_weight"], "coded_bits_per_weight": figures["coded_bits_per_weight"],
            "dense_tokens_per_s": statistics.median(speeds["dense"]),
            "coded_tokens_per_s": statistics.median(speeds["coded"]),
            "dense_weight_bytes": resident_bytes(dense), "coded_weight_bytes": resident_bytes(coded)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--generations", type=int, default=GENERATIONS)
    parser.add_argument("--gemma-file", type=Path, help="a compressed Gemma-270M (default: compressed once to out/)")
    parser.add_argument("--skip-gemma", action="store_true")
    parser.add_argument("--threads", type=int, help="CPU threads for dense and coded alike (default: torch's)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch

    from vqcompress import kernels

    if args.threads:
        torch.set_num_threads(args.threads)
    started = now()
    result = {"started": started, "load_average_before": os.getloadavg()[0],
              "machine": machine() | {"threads": torch.get_num_threads()}, "device": args.device,
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "backend": kernels.backend() if args.device == "cpu" else "pure torch on CUDA (no compiled kernel)",
              "layer": {"shape": [SIDE, SIDE], "dim": DIM, "k": K, "scale": "row", "repeats": args.repeats,
                        "rows": layer_bench(args.device, args.repeats)}}
    if not args.skip_gemma:
        result["gemma"] = gemma_bench(gemma_file(args.gemma_file), args.device, args.generations)
        print(json.dumps(result["gemma"], indent=1))
    result["finished"], result["load_average_after"] = now(), os.getloadavg()[0]
    write_json(args.output, result)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
