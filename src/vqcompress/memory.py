"""Giving freed memory back to the system between the long steps of a compression."""

from __future__ import annotations

import ctypes


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
