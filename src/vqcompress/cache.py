"""Where the project keeps what it builds on first use (compiled kernels, universal codebooks,
models assembled from their packages): ``$VQC_CACHE``, else ``~/.cache/vqcompress``; outside the
repository, since Gemma's terms of use forbid committing its weights."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("VQC_CACHE") or Path.home() / ".cache" / "vqcompress")
