"""Giving memory back to the system between the long steps of a compression: freed heap, and
the pages of a memory-mapped model's weights once they are coded."""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``).

    Tensors smaller than glibc's mmap threshold, which rises to 32 MB as larger blocks are
    freed, live on the heap, and a freed heap stays resident: 1 GB of 256 KB tensors, freed,
    still counted in the process's memory until trimmed. A tokenizer's work and each block's
    activations leave such holes, and every later peak would stand on them. Where the C library
    has no ``malloc_trim`` (macOS, musl), nothing happens."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


#: mallopt(3)'s M_MMAP_THRESHOLD, and the size from which blocks get their own mapping
_M_MMAP_THRESHOLD = -3
OWN_MAPPING_BYTES = 4 << 20


def map_large_blocks() -> None:
    """Give every allocation of 4 MiB or more its own mapping, returned to the system when freed.

    glibc raises that threshold to the largest block freed so far (up to 32 MiB): after the
    first large temporary, a layer fit's many 5–20 MB temporaries live on the heap and fragment
    it. One jlcm fit of a 2048 × 640 layer left 680 MB resident where at most 210 MB were live.
    The price is fresh pages for each such block: that fit alone was 35% slower, though
    Gemma's whole jlcm compression was not (492 s against 504). It changes the
    process's allocator for good, so ``vqc compress`` calls it and the library does not."""
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, OWN_MAPPING_BYTES)
    except (OSError, AttributeError):
        pass


#: madvise(2)'s MADV_PAGEOUT (Linux 5.4+): reclaim the range's pages now. A file-backed page is
#: dropped (read from the file again if touched); a page this process wrote to is kept, or
#: swapped: nothing is ever lost, unlike MADV_DONTNEED, which discards a private page's writes.
_MADV_PAGEOUT = 21


def release_pages(tensors: Iterable[torch.Tensor]) -> None:
    """Drop the pages of memory-mapped CPU tensors from this process's resident memory.

    A model loaded from safetensors is a view of its file: each weight's pages become resident
    when first read (a NaN check reads them all) and stay, even once the tensor is freed, while
    the file stays mapped. A compression that has coded a layer never reads its dense weight
    again, so handing those pages back keeps the peak near one block's weights, not the whole
    model's. Tensors that are not file-backed, and systems without the call, are left alone."""
    tensors = [t for t in tensors if t.device.type == "cpu" and t.numel()]
    mappings = _file_mappings() if tensors else []
    if not mappings:
        return
    libc, page = ctypes.CDLL(None), mmap.PAGESIZE
    for tensor in tensors:
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        if tensor.is_contiguous() and any(low <= start and end <= high for low, high in mappings):
            first, last = -(-start // page) * page, end // page * page  # whole pages of this tensor's only
            if last > first:
                libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_PAGEOUT)


@contextmanager
def released_after_use(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Within the block, each module's memory-mapped weights are paged out (``release_pages``) as
    soon as its forward pass ends: a pass over a model read from its file then holds one block's
    pages, not the whole model's (the page cache still has them for the next pass)."""
    handles = [module.register_forward_hook(lambda module, args, output: release_pages(module.parameters()))
               for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _file_mappings() -> list[tuple[int, int]]:
    """The address ranges of this process's file-backed mappings (none where there is no /proc)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[4] != "0" and fields[5].startswith("/"):  # an inode and a path
            low, high = (int(part, 16) for part in fields[0].split("-"))
            ranges.append((low, high))
    return ranges
