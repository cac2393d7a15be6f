"""Atomic file writes: a temp file in the target's folder, renamed into place when complete.

An interrupted or failed write (Ctrl-C, a full disk, an exception) leaves no half file behind
and never replaces a good file with a broken one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import VQCError


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(temp_path)``, then rename the temp file to ``path``; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temp)
        os.chmod(temp, 0o644)  # mkstemp makes it private; a result is readable like any other file
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)
    return path


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Fail now, in one line, where ``path`` could not be written later: a folder in its place, a
    parent that is a file, a folder that refuses files (read-only, /proc …). Runs before any work,
    so a bad path costs a second, not the run; makes and leaves nothing (a probe file in the
    nearest existing folder, removed at once)."""
    path = Path(path)
    if path.is_dir():
        raise VQCError(f"{what} {path} is a folder: give a file name")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise VQCError(f"cannot write {what} {path}: {folder} is not a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise VQCError(f"cannot write {what} {path}: {error.strerror or error}") from None
    return path
