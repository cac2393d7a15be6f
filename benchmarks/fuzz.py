"""`make fuzz`: small valid .vqc files of every form, mutated, each mutation loaded, reported and
inspected in a worker process held to a time and a memory limit.

    .venv/bin/python -m benchmarks.fuzz                 # 10,000 mutations per form and kind
    .venv/bin/python -m benchmarks.fuzz --cases 500     # a shorter run

Two kinds of mutation. ``bytes``: a stranger's file, its bytes flipped, overwritten, cut or
inserted anywhere; it must load with the original's outputs or fail with ``VQCError``.
``manifest``: a deliberate edit, 1–3 fields of the stored manifest replaced, removed or added and
the manifest's sha256 made anew, so that the schema alone stands in the way; it must fail with
``VQCError`` or load (a consistent edit may change the model: a rotation added, a recipe
renamed; such cases are counted apart). Either way nothing else may be raised, and no case may
take over ``SECONDS`` or allocate over ``MEMORY``. The counts go to benchmarks/results/fuzz.json
and from there (render.py) to docs/benchmarks.md. The tests (tests/test_io_fuzz.py) run the
same forms and mutations, fewer of them, under hypothesis.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import io as text_io
import json
import math
import multiprocessing
import os
import random
import resource
import signal
import sys
import tempfile
import time
import traceback
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import vqcompress as vqc
from vqcompress import cli, io
from vqcompress.errors import VQCError

RESULTS = Path(__file__).resolve().parent / "results" / "fuzz.json"
SECONDS = 5.0  # a case's time limit
MEMORY = 1 << 30  # a case's memory limit, bytes of address space beyond the worker's own at start
KINDS = ("bytes", "manifest")


class Tied(nn.Module):
    """A token table and an output layer holding the same weight (a tied language-model head)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(128, 32)
        self.head = nn.Linear(32, 128, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))


def _table() -> nn.Module:
    return nn.Sequential(nn.Embedding(256, 16))


@dataclass(frozen=True)
class Form:
    """One form of coded weight: a skeleton to load into, its inputs, and how it is compressed."""

    skeleton: Callable[[], nn.Module]
    inputs: Callable[[], torch.Tensor]
    compress: Callable[[nn.Module], nn.Module]


def _vectors() -> torch.Tensor:
    return torch.randn(4, 64, generator=torch.Generator().manual_seed(1))


def _ids(top: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randint(0, top, (2, 12), generator=torch.Generator().manual_seed(1))


EVERY_LAYER = vqc.Plan(min_weights=0)  # the MLP's 2,048-weight output layer too
FORMS = {
    "plain": Form(_mlp, _vectors, lambda m: vqc.compress(m, "kmeans", bits=2, scale="none", plan=EVERY_LAYER,
                                                         progress=False)),
    "scales": Form(_mlp, _vectors, lambda m: vqc.compress(m, "kmeans", bits=2, scale="row", plan=EVERY_LAYER,
                                                          progress=False)),
    "permutation": Form(_table, _ids(256), lambda m: vqc.compress(m, "jlcm", bits=1, steps=0, progress=False)),
    "factor": Form(_mlp, _vectors, lambda m: vqc.compress(m, "qswd", dim=4, k=16, terms=2, coef_bits=2, codebook_bits=4,
                                                          progress=False)),
    "universal": Form(_mlp, _vectors, lambda m: vqc.compress(m, "vq4all", bits=3, progress=False)),
    "kept": Form(_table, _ids(256), lambda m: vqc.compress(m, "kmeans", bits=2, plan=vqc.Plan(by_name={"0": {"keep_rows": 24}}),
                                                           progress=False)),
    "tied": Form(Tied, _ids(128), lambda m: vqc.compress(m, "kmeans", bits=2, plan=vqc.Plan(by_name={"embed|head": {}}),
                                                         progress=False)),
}


def original(form: str, folder: Path) -> tuple[bytes, torch.Tensor]:
    """The form's valid file (written once into ``folder``) and its model's outputs."""
    path = folder / f"{form}.vqc"
    if not path.exists():
        torch.manual_seed(0)
        vqc.save(FORMS[form].compress(FORMS[form].skeleton().eval()), path)
    return path.read_bytes(), outputs(form, path)


def outputs(form: str, path: Path) -> torch.Tensor:
    torch.manual_seed(1)  # the skeleton's own weights must not matter
    with torch.no_grad():
        return vqc.load(path, like=FORMS[form].skeleton())(FORMS[form].inputs())


# -- mutations ---------------------------------------------------------------------------------

def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """A stranger's file: 1–3 edits of flipped, overwritten, cut or inserted bytes; half of them
    in the header (the first bytes, where the manifest is)."""
    data = bytearray(data)
    header = 8 + int.from_bytes(data[:8], "little")
    for _ in range(rng.randint(1, 3)):
        if not data:
            break
        at = rng.randrange(min(header, len(data)) if rng.random() < 0.5 else len(data))
        edit = rng.choice(("flip", "overwrite", "cut", "insert", "length"))
        if edit == "flip":
            data[at] ^= 1 << rng.randrange(8)
        elif edit == "overwrite":
            data[at:at + 8] = rng.randbytes(8)
        elif edit == "cut":
            data = data[:at] + data[at + rng.randint(1, 64):] if rng.random() < 0.5 else data[:at]
        elif edit == "insert":
            data[at:at] = rng.randbytes(rng.randint(1, 16))
        else:
            data[:8] = (header + rng.choice((-8, -1, 1, 8, 1 << 20, 1 << 40))).to_bytes(8, "little", signed=True)
    return bytes(data)


VALUES = (0, 1, 2, 3, -1, 255, 256, 65537, 2**31, 2**63, 1e9, 0.5, float("nan"), "", "x", "uint8", "int8", "float32",
          "bfloat16", "hadamard", True, False, None, [], {}, [1, 2], [0], {"a": 1}, "0" * 64)


def _paths(value: object, path: tuple = ()) -> list[tuple]:
    """Every node of a JSON value, as a tuple of keys and indices from the root."""
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    return [path, *[p for key, item in children for p in _paths(item, (*path, key))]]


def _at(value: object, path: tuple) -> object:
    for key in path:
        value = value[key]
    return value


def edit_manifest(stored: dict, rng: random.Random) -> dict:
    """One field of a stored manifest replaced (by a value of the palette or another field's),
    removed, or a field added beside it."""
    nodes = _paths(stored)
    path = rng.choice(nodes[1:])
    parent, key = _at(stored, path[:-1]), path[-1]
    edit = rng.choice(("replace", "replace", "other", "remove", "add"))
    value = copy.deepcopy(_at(stored, rng.choice(nodes)) if edit == "other" else rng.choice(VALUES))  # never shared
    if edit == "remove":
        del parent[key]
    elif edit == "add" and isinstance(parent, dict):
        parent[rng.choice(("extra", "k", "shape", "rotation", "device"))] = value
    else:
        parent[key] = value
    return stored


def with_manifest_edited(data: bytes, rng: random.Random, folder: Path) -> bytes:
    """The file with 1–3 manifest edits (``edit_manifest``) and the manifest's sha256 made anew."""
    path = folder / f"edit-{os.getpid()}.vqc"
    path.write_bytes(data)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        stored = json.loads(zlib.decompress(base64.b85decode(handle.metadata()[io.ZLIB_KEY])))
    stored.pop(io.MANIFEST_HASH)
    for _ in range(rng.randint(1, 3)):
        stored = edit_manifest(stored, rng)
    stored[io.MANIFEST_HASH] = io._manifest_sha256(stored)
    text = base64.b85encode(zlib.compress(json.dumps(stored, sort_keys=True).encode())).decode()
    save_file(tensors, str(path), metadata={io.ZLIB_KEY: text})
    return path.read_bytes()


def mutated(kind: str, data: bytes, rng: random.Random, folder: Path) -> bytes:
    return mutate_bytes(data, rng) if kind == "bytes" else with_manifest_edited(data, rng, folder)


# -- one case ----------------------------------------------------------------------------------

def outcome(form: str, data: bytes, expected: torch.Tensor, folder: Path) -> str:
    """What ``load`` (and a forward pass), ``report`` and ``vqc inspect`` (text and JSON) make of a
    file: "same" (it loads and gives the original's outputs), "changed" (it loads, other outputs),
    "refused" (a VQCError), or "crash: <exception> in <function>" for anything else."""
    path = folder / f"case-{os.getpid()}.vqc"
    path.write_bytes(data)
    result = "refused"
    try:
        got = outputs(form, path)
        result = "same" if got.shape == expected.shape and torch.equal(got, expected) else "changed"
    except VQCError:
        pass
    except Exception as error:  # what the fuzzer looks for
        return crash(error)
    for action in (lambda: str(vqc.report(path)), lambda: cli.inspect(path, json_out=False),
                   lambda: cli.inspect(path, json_out=True)):
        try:
            with contextlib.redirect_stdout(text_io.StringIO()):
                action()
        except VQCError:
            pass
        except Exception as error:
            return crash(error)
    return result


def crash(error: BaseException) -> str:
    """An exception that is not a VQCError, as "crash: <type> in <innermost function of ours>"."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if "vqcompress" in frame.filename]
    where = f"{Path(frames[-1].filename).name}:{frames[-1].name}" if frames else "?"
    if isinstance(error, MemoryError) or "can't allocate memory" in str(error):
        return "memory"
    return f"crash: {type(error).__name__} in {where}"


# -- the long run ------------------------------------------------------------------------------

_WORKER: dict = {}


def _start_worker(folder: str) -> None:
    """A worker: its address space limited to what it holds now plus ``MEMORY``; the originals."""
    with open("/proc/self/statm") as statm:
        held = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (held + MEMORY, resource.RLIM_INFINITY))
    torch.set_num_threads(1)
    _WORKER.update(folder=Path(folder), originals={form: original(form, Path(folder)) for form in FORMS})


def _case(job: tuple[str, str, int]) -> tuple[str, float]:
    """One mutation's outcome and seconds; a case still running after twice ``SECONDS`` ends its
    worker (SIGALRM's default action), and the parent counts it lost."""
    form, kind, seed = job
    data, expected = _WORKER["originals"][form]
    signal.alarm(math.ceil(2 * SECONDS))
    started = time.perf_counter()
    try:
        data = mutated(kind, data, random.Random(seed), _WORKER["folder"])
    except (TypeError, ValueError):  # an edit JSON cannot hold (a key that is no string): nothing to try
        return "skipped", 0.0
    result = outcome(form, data, expected, _WORKER["folder"])
    signal.alarm(0)
    return result, time.perf_counter() - started


def run(cases: int, workers: int) -> dict:
    """``cases`` mutations of each kind for every form, in ``workers`` processes."""
    counts: dict[str, Counter] = {f"{form}/{kind}": Counter() for form in FORMS for kind in KINDS}
    failures: dict[str, list] = {}
    slowest, started = 0.0, time.perf_counter()
    jobs = [(form, kind, seed) for seed in range(cases) for form in FORMS for kind in KINDS]
    with tempfile.TemporaryDirectory() as folder:
        for form in FORMS:  # written before the workers fork: none of them compresses
            original(form, Path(folder))
        pool = multiprocessing.get_context("fork").Pool(workers, _start_worker, (folder,))
        for done, (job, waiting) in enumerate([(job, pool.apply_async(_case, (job,))) for job in jobs]):
            if done % (len(jobs) // 10 or 1) == 0:
                print(f"{done:,} of {len(jobs):,} cases, {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
            try:
                result, seconds = waiting.get(timeout=4 * SECONDS)
            except multiprocessing.TimeoutError:  # its worker ended by its alarm, or by the memory limit
                result, seconds = "lost", 2 * SECONDS
            except Exception as error:  # the fuzzer's own failure, counted and shown, not the run's end
                result, seconds = f"fuzzer error: {type(error).__name__}", 0.0
            slowest = max(slowest, seconds)
            counts[f"{job[0]}/{job[1]}"].update([result] + (["over 5 s"] if seconds > SECONDS else []))
            if result not in ("same", "refused", "changed", "skipped") or (job[1] == "bytes" and result == "changed"):
                failures.setdefault(result, []).append(list(job))
        pool.terminate()
    totals = Counter()
    for value in counts.values():
        totals.update(value)
    return {"finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cases_per_form_and_kind": cases,
            "forms": list(FORMS), "kinds": list(KINDS), "seconds": round(time.perf_counter() - started, 1),
            "limits": {"seconds": SECONDS, "memory_bytes": MEMORY}, "slowest_case_seconds": round(slowest, 3),
            "totals": dict(totals), "counts": {key: dict(value) for key, value in counts.items()},
            "failures": {key: value[:5] for key, value in failures.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000, help="mutations per form and kind")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    result = run(args.cases, args.workers)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({key: value for key, value in result.items() if key != "counts"}, indent=1))


if __name__ == "__main__":
    main()
