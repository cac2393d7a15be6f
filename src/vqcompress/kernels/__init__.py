"""Compiled CPU kernels for coded layers: the lookup-table product and a decode for large batches.

``lut.cpp`` is plain C++ with OpenMP, compiled on first use (``compiled.py``) and called
through ``ctypes`` with raw pointers to the coded weight's own buffers: the packed codes are read where they lie, never
unpacked into a copy of the whole matrix. When it cannot be built (no compiler, a failed
build), or ``VQC_KERNEL=torch`` is set, or the call is outside what it serves (a device other
than the CPU, a dtype other than float32, gradients wanted), ``lut_matmul`` returns None and
the caller runs the pure-torch formulation. ``backend()`` says which, and why.

Why this tool, by measurement on the 2-core AMD EPYC (Zen 4, AVX-512) these were developed on,
one thread, the 4096 × 4096 layer at d = 4, k = 256 (4 M table lookups), same process and arrays:
numba 0.68 (``prange``, fastmath) gathers in 2.7–2.9 ms and this C++ builds the table and gathers
in 3.0–3.1 ms (about 0.15 ms of it the table): the same speed, which is the speed of the table's
reads from L2. The choice rests on the rest: this source needs no new dependency (numba and
llvmlite are a 40 MB pair pinned to numpy's versions), compiles in under a second once per
machine (numba compiled for 2.5 s in every new process, every ``vqc`` command and test
subprocess) and sets its own threads (none below a measured amount of work, where waking them
costs more than they save). ``torch.compile`` of the torch formulation compiled for 18 s and ran
in 21.6 ms; ``torch.utils.cpp_extension`` would compile against torch's headers (30–60 s, and
ninja) for nothing a kernel that reads raw buffers uses.

On CUDA there is no compiled kernel: coded layers on a GPU run the pure-torch formulation
(``layers.lut_matmul``), which is the same table and gather as torch tensor operations.

Which path a call takes: the table costs about k·d multiply-adds per input and per segment and
the gather one load per weight, for every input vector; decoding the weight once (compiled) and
multiplying densely costs a pass over the weight plus the dense product, which torch's GEMM does
far faster per input than the gather once there are several. ``lut_matmul`` compares the two
estimates (constants measured on the machine above) and takes the cheaper: batch 1 and small
batches go through the table, large batches and convolutions over many positions through
decode-then-multiply, in blocks of rows so that no dense copy of a large weight is ever held.
A large codebook (k = 2^16 at d = 8: E8P, a universal codebook) makes the table cost far more
than the codes it serves; there small batches gather the codewords and multiply them instead
(``way``: "gather"), E8P's decoded from their structure rather than read from its 1 MiB table.

Threads: a coded layer's default forward path ("auto", ``layers``) comes here for every CPU call,
so the kernel must not collapse when other processes share the cores. It shares torch's OpenMP
runtime (the same ``libgomp.so.1`` is loaded once), whose waiting threads sleep when
``OMP_WAIT_POLICY=PASSIVE`` (``vqcompress`` sets it); but a thread on a core another process keeps
busy runs only when the scheduler gives it a slice, and every barrier of the call waits for it.
So each call takes ``threads()``: torch's count, capped by the cores the other processes left free
lately, one on a loaded machine. Splitting rows dynamically instead did not help: the barrier still
waits for the thread that is not running (docs/methods.md).
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from .. import compiled, lattice
from ..coded import CodedWeight, code_bits

SOURCE = Path(__file__).with_name("lut.cpp")
FORCE_TORCH = compiled.FORCE_TORCH
DECODE_BLOCK = 1 << 22  # weights decoded at a time by the large-batch path (16 MiB of float32)
LOOK_INTERVAL = 0.1  # seconds between two looks at how busy other processes keep the cores

# Measured costs in nanoseconds, one thread of the 2-core EPYC (the same ratios hold on two): a
# table multiply-add, a gather, decoding one weight (with the small products' fixed costs), one
# multiply-add of torch's dense product. On the 4096 × 4096 layer, d = 4, k = 256, they put the
# crossover between batch 4 and 5, where it was measured.
TABLE_NS, GATHER_NS, DECODE_NS, GEMM_NS = 0.15, 0.65, 0.65, 0.021
# The gather product at d = 8, per weight and input vector (4096 × 4096, one thread): codewords read
# from the table, and E8P's decoded from their structure.
CODEWORD_NS, E8P_NS = 0.10, 0.093


class _Coded(ctypes.Structure):
    """Mirror of ``Coded`` in lut.cpp."""

    _fields_ = [(name, ctypes.c_int64) for name in (
        "rows", "cols", "k", "dim", "groups", "scale_group", "bits", "code_bytes", "perm_bits", "perm_bytes")] + [
        (name, ctypes.c_void_p) for name in ("codes", "codebook", "scale", "offset", "perm")] + [
        ("gain", ctypes.c_float), ("lattice", ctypes.c_void_p)]


def _load() -> tuple[ctypes.CDLL | None, str]:
    lib, why = compiled.load(SOURCE)
    if lib is not None:
        lib.vqc_lut_matmul.argtypes = [ctypes.POINTER(_Coded), ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                       ctypes.c_void_p, ctypes.c_int]
        lib.vqc_gather_matmul.argtypes = [ctypes.POINTER(_Coded), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                          ctypes.c_int]
        lib.vqc_decode.argtypes = [ctypes.POINTER(_Coded), ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    return lib, why


_library: ctypes.CDLL | None = None
_backend: str | None = None
_forced: str | None = None  # see ``forced``


def _lib() -> ctypes.CDLL | None:
    """The compiled library, built on the first call that needs it; None when unavailable."""
    global _library, _backend
    if _backend is None:
        _library, _backend = _load()
    return _library


def backend() -> str:
    """The CPU path coded layers take, in words: the compiled kernel or the torch fallback and why."""
    _lib()
    return _backend


def reset() -> None:
    """Forget the choice, so the next call chooses again (after changing ``VQC_KERNEL``)."""
    global _library, _backend
    _library, _backend = None, None


@contextmanager
def forced(path: str) -> Iterator[None]:
    """Inside the block every call takes ``path``: "table", "gather" or "decode" (the compiled
    kernel's ways, when it is available; see ``way``) or "torch" (the fallback); for tests and
    benchmarks."""
    global _forced
    if path not in ("table", "gather", "decode", "torch"):
        raise ValueError(f"unknown kernel path {path!r}")
    saved, _forced = _forced, path
    try:
        yield
    finally:
        _forced = saved


def _pointer(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _describe(code: CodedWeight) -> _Coded:
    lay = code.layout
    return _Coded(
        lay.rows, lay.cols, lay.k, lay.dim, lay.groups, lay.scale_group or 0, lay.bits, code.codes.numel(),
        code_bits(lay.rows) if lay.permuted else 0, code.perm.numel() if lay.permuted else 0,
        _pointer(code.codes), _pointer(code.codebook), _pointer(code.scale if lay.scale_group else None),
        _pointer(code.offset if lay.offset else None), _pointer(code.perm if lay.permuted else None),
        float(code.gain) if lay.gain else 1.0, _pointer(lattice.kernel_tables() if is_e8p(code) else None))


_E8P: dict[str, bool] = {}  # codebook sha256 → whether its table is E8P's, checked once a process


def is_e8p(code: CodedWeight) -> bool:
    """Whether the codebook is the E8P table (``lattice``): the kernel then decodes the codes from
    their structure. Known by the layout's codebook hash, the table compared once per hash."""
    lay = code.layout
    if not lay.codebook_sha256 or (lay.k, lay.dim, lay.groups, lay.bits) != (lattice.K, lattice.DIM, 1, 16):
        return False
    if lay.codebook_sha256 not in _E8P:
        _E8P[lay.codebook_sha256] = torch.equal(code.codebook.reshape(lattice.K, lattice.DIM), lattice.table().half())
    return _E8P[lay.codebook_sha256]


def codes_suffice(x: Tensor, code: CodedWeight) -> bool:
    """Whether this call may be computed from the codes without autograd: no gradients wanted, and
    not a soft or candidate assignment in training (whose weight is not its codes')."""
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in code.parameters()))
    return not wants_grad and (code.assigner is None or code.assigner.hard)


def _serves(x: Tensor, code: CodedWeight) -> bool:
    """Whether the compiled kernel computes this call: CPU float32, fp16 stored tensors, the codes
    suffice, one codeword per sub-vector (the factor form goes through torch)."""
    lay = code.layout
    if lay.factored or not codes_suffice(x, code):
        return False
    halves = [code.codebook, *([code.scale] if lay.scale_group else []), *([code.offset] if lay.offset else [])]
    return (x.device.type == "cpu" and x.dtype == torch.float32 and code.codes.device.type == "cpu"
            and all(t.dtype == torch.float16 and t.is_contiguous() for t in halves))


def serves(x: Tensor, code: CodedWeight) -> bool:
    """Whether ``lut_matmul`` computes y = x · Wᵀ for this call with the compiled kernel (rather than
    return None): what a coded layer's "auto" forward path asks."""
    return _forced != "torch" and _serves(x, code) and _lib() is not None


_look: tuple[float, float, float] | None = None  # the last look: wall clock, busy seconds of our cores, ours
_free = 1  # threads that look allowed: one until two looks have measured the others' load


def busy_seconds(cpus: set[int]) -> float | None:
    """CPU seconds the cores ``cpus`` have been busy since boot (/proc/stat); None where unreadable."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    ticks = 0
    for name, *fields in (line.split() for line in lines):
        if name[:3] == "cpu" and name[3:].isdigit() and int(name[3:]) in cpus:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])  # guest is in user
            ticks += user + nice + system + irq + softirq + steal
    return ticks / os.sysconf("SC_CLK_TCK")


def threads() -> int:
    """Threads for the next kernel call: torch's count, capped by the cores other processes left free
    over the last ``LOOK_INTERVAL`` or more (this process's own CPU time taken out), at least one.
    A thread on a core another process keeps busy gets a time slice now and then, and every
    barrier of the call waits for it: two threads on two busy cores ran the table several times
    slower than one (docs/methods.md)."""
    global _look, _free
    now = time.monotonic()
    if _look is None or now - _look[0] >= LOOK_INTERVAL:
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        busy, own = busy_seconds(cpus), time.process_time()
        if busy is None:
            _free = len(cpus)
        elif _look is not None:
            others = max(0.0, busy - _look[1] - (own - _look[2])) / (now - _look[0])
            _free = max(1, int(len(cpus) - others + 0.5))
        _look = (now, busy or 0.0, own)
    return min(torch.get_num_threads(), _free)


def way(batch: int, code: CodedWeight, input_groups: int = 1) -> str:
    """How the kernel computes a product of ``batch`` input vectors: "table" (the lookup table, k·d
    multiply-adds per segment and a gather per code), "gather" (codewords gathered and multiplied,
    d = 8 Linear layers only: a large codebook's table costs more than the codes it serves) or
    "decode" (decode once, torch's dense product). As ``forced`` (a forced gather the layout does
    not take goes through the table), else the cheapest by the measured costs."""
    lay = code.layout
    gathers = lay.dim == 8 and input_groups == 1
    if _forced in ("table", "decode", "gather"):
        return "table" if _forced == "gather" and not gathers else _forced
    weights = lay.rows * lay.cols
    costs = {"table": batch * (input_groups * lay.groups * lay.cols * lay.k * TABLE_NS + weights / lay.dim * GATHER_NS),
             "decode": weights * (DECODE_NS + batch * GEMM_NS)}
    if gathers:
        costs["gather"] = batch * weights * (E8P_NS if is_e8p(code) else CODEWORD_NS)
    return min(costs, key=costs.get)


def lut_matmul(x: Tensor, code: CodedWeight, input_groups: int = 1) -> Tensor | None:
    """y = x · Wᵀ for ``x`` of shape (batch, input_groups, cols), rows in original order, by the
    compiled kernel the cheapest ``way``. None when the kernel does not serve this call (see the
    module docstring): the caller falls back to torch."""
    if not serves(x, code):
        return None
    lib, lay = _lib(), code.layout
    x = x.contiguous()
    batch, weight, count = x.shape[0], _describe(code), threads()
    chosen = way(batch, code, input_groups)
    if chosen == "decode":
        return _decode_matmul(lib, weight, x, code, input_groups, count)
    y = torch.empty(batch, lay.rows)
    if chosen == "gather":
        lib.vqc_gather_matmul(ctypes.byref(weight), x.data_ptr(), batch, y.data_ptr(), count)
    else:
        lib.vqc_lut_matmul(ctypes.byref(weight), x.data_ptr(), batch, input_groups, y.data_ptr(), count)
    return y


def _decode(lib: ctypes.CDLL, weight: _Coded, first: int, last: int, threads: int) -> Tensor:
    rows = torch.empty(last - first, weight.cols)
    lib.vqc_decode(ctypes.byref(weight), first, last, rows.data_ptr(), threads)
    return rows


def _original_rows(lib: ctypes.CDLL, weight: _Coded, code: CodedWeight, threads: int) -> Tensor:
    """The whole decoded (rows, cols) matrix, rows in original order."""
    dense = _decode(lib, weight, 0, weight.rows, threads)
    return torch.empty_like(dense).index_copy_(0, code.permutation(), dense) if code.layout.permuted else dense


def decode(code: CodedWeight) -> Tensor:
    """The dense float32 weight in its original shape, kept rows included, by the compiled decode
    (where ``serves`` says the kernel serves the layer): what a coded convolution's "auto" path
    hands to torch's own convolution, which beats im2col and a matrix product."""
    dense = _original_rows(_lib(), _describe(code), code, threads())
    if code.layout.kept_rows:
        dense.index_copy_(0, code.kept_row_numbers(), code.kept_matrix())
    return dense.reshape(code.layout.shape)


def _decode_matmul(lib: ctypes.CDLL, weight: _Coded, x: Tensor, code: CodedWeight, input_groups: int,
                   threads: int) -> Tensor:
    """Decode, then torch's dense product. One input group (a Linear): blocks of rows, never the
    whole dense weight at once. Grouped convolutions: the whole (convolution-sized) weight, its rows
    put back in original order, one batched product per group."""
    lay = code.layout
    if input_groups == 1:
        block = max(1, DECODE_BLOCK // lay.cols)
        y = torch.cat([x[:, 0] @ _decode(lib, weight, first, min(lay.rows, first + block), threads).T
                       for first in range(0, lay.rows, block)], dim=1)
        return torch.empty_like(y).index_copy_(1, code.permutation(), y) if lay.permuted else y
    per_group = _original_rows(lib, weight, code, threads).reshape(input_groups, lay.rows // input_groups, lay.cols)
    return torch.bmm(x.transpose(0, 1), per_group.transpose(1, 2)).transpose(0, 1).reshape(x.shape[0], lay.rows)
