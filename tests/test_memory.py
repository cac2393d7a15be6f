"""Freed heap memory and a memory-mapped weight's pages go back to the system."""

import gc
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vqcompress.memory import release_free_memory, release_pages, released_after_use


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


@pytest.mark.skipif(platform.system() != "Linux", reason="/proc and madvise")
def test_a_memory_mapped_weight_leaves_the_resident_memory_and_keeps_its_values(tmp_path):
    path = tmp_path / "weight.bin"
    np.random.default_rng(0).standard_normal(16 * 1024 * 1024, dtype=np.float32).tofile(path)  # 64 MiB
    weight = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c"))  # private, as safetensors maps
    assert torch.isfinite(weight.sum())  # every page read, as the NaN check does
    weight[:1024] = 7.0  # a written page: this process's own, never dropped
    before = resident_mib()
    release_pages([weight])
    assert resident_mib() < before - 32
    assert torch.equal(weight[:1024], torch.full((1024,), 7.0))
    assert torch.equal(weight[1024:], torch.from_numpy(np.fromfile(path, dtype=np.float32)[1024:]))


@pytest.mark.skipif(platform.system() != "Linux", reason="/proc and madvise")
def test_a_module_s_mapped_weight_leaves_after_its_forward_pass(tmp_path):
    path = tmp_path / "weight.bin"
    np.random.default_rng(0).standard_normal(4096 * 4096, dtype=np.float32).tofile(path)  # 64 MiB
    layer = torch.nn.Linear(4096, 4096, bias=False)
    layer.weight = torch.nn.Parameter(torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c")).reshape(4096, 4096),
                                      requires_grad=False)
    x = torch.randn(2, 4096)
    expected = x @ torch.from_numpy(np.fromfile(path, dtype=np.float32)).reshape(4096, 4096).T
    before = resident_mib()
    with released_after_use([layer]):
        assert torch.allclose(layer(x), expected, atol=1e-4)
    assert resident_mib() < before + 32  # the pass read all 64 MiB
    layer(x)
    assert resident_mib() > before + 32  # outside the block they stay


def test_a_weight_in_ordinary_memory_is_left_alone():
    weight = torch.arange(1 << 20, dtype=torch.float32)
    release_pages([weight, torch.empty(0)])
    assert torch.equal(weight, torch.arange(1 << 20, dtype=torch.float32))


LARGE_BLOCKS = """
import sys
from pathlib import Path
import torch
from vqcompress.memory import map_large_blocks
resident = lambda: int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
map_large_blocks()
torch.ones(4 << 20)  # a 16 MiB block, freed at once: by default glibc's threshold rises to it
blocks, pins = [], []
for _ in range(64):  # 5 MiB blocks between small tensors that stay: holes, not the heap's top
    blocks.append(torch.ones(5 << 18))
    pins.append(torch.ones(256))
before = resident()
del blocks
print(before - resident())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_large_blocks_go_back_to_the_system_when_freed():
    freed = subprocess.run([sys.executable, "-c", LARGE_BLOCKS], capture_output=True, text=True, check=True).stdout
    assert float(freed) > 300  # of 320 MiB (without the call, about 210 here)
