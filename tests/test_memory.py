"""Freed heap memory goes back to the system."""

import gc
import platform
from pathlib import Path

import pytest
import torch

from vqcompress.memory import release_free_memory


def resident_mib() -> float:
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's heap")
def test_freed_small_tensors_leave_the_resident_memory():
    tensors = [torch.ones(64 * 1024) for _ in range(1024)]  # 256 MiB in 256 KiB pieces
    before = resident_mib()
    del tensors
    gc.collect()
    release_free_memory()
    assert resident_mib() < before - 128
