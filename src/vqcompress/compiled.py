"""C++ sources compiled on first use: plain C++ with OpenMP, built with the system compiler
(``$CXX``, else ``g++``; ``FLAGS``) into ``~/.cache/vqcompress/kernels`` under a hash of the
source, flags, compiler and CPU, and loaded through ``ctypes``. No torch headers, so a source
compiles in about a second, once per machine. Set ``VQC_KERNEL=torch`` to use none of them (every
caller then runs its pure-torch formulation)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
from pathlib import Path

from .atomic import write_atomically
from .cache import cache_dir

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
FORCE_TORCH = "VQC_KERNEL"  # set to "torch" to always take the pure-torch path


def _cpu_identity() -> str:
    """What ``-march=native`` compiles for: a build is only reused on the same kind of CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next((line for line in lines if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor()


def compiler() -> str:
    return os.environ.get("CXX", "g++")


def build(source: Path) -> ctypes.CDLL:
    """Compile ``source`` once per source, flags, compiler and CPU (cached), and load it; raises
    ``RuntimeError`` (or ``OSError``) when it cannot."""
    version = subprocess.run([compiler(), "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([source.read_text(), *FLAGS, version, _cpu_identity()]).encode()).hexdigest()
    library = cache_dir() / "kernels" / f"{source.stem}-{key[:16]}.so"
    if not library.exists():
        def compile_to(temp: str) -> None:
            done = subprocess.run([compiler(), *FLAGS, str(source), "-o", temp], capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{compiler()} failed: {(done.stderr.strip().splitlines() or ['?'])[0]}")

        write_atomically(library, compile_to)
    return ctypes.CDLL(str(library))


def load(source: Path) -> tuple[ctypes.CDLL | None, str]:
    """The compiled ``source``, or None and why not, in words."""
    if os.environ.get(FORCE_TORCH, "").lower() == "torch":
        return None, f"torch (forced by {FORCE_TORCH}=torch)"
    try:
        return build(source), f"compiled C++ ({compiler()} {' '.join(FLAGS[:3])}, OpenMP)"
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        return None, f"torch (the C++ kernel could not be built: {error})"
