"""Atomic file writes: a temp file in the target's folder, renamed into place when complete.

An interrupted or failed write (Ctrl-C, a full disk, an exception) leaves no half file behind
and never replaces a good file with a broken one.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor

from .errors import VQCError


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(temp_path)``, then rename the temp file to ``path``; returns ``path``. The temp
    file's name holds the writer's process id, so that one a killed process left (SIGKILL, power
    loss) is removed by the next write of ``path``. The disk or folder failing (full, read-only,
    gone, over a file-size limit) is one VQCError, the temp file removed."""
    path = Path(path)
    temp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_orphans(path)
        handle, temp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
        write(temp)
        os.chmod(temp, 0o644)  # mkstemp makes it private; a result is readable like any other file
        os.replace(temp, path)
    except OSError as error:
        raise VQCError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        if temp is not None:
            with contextlib.suppress(OSError):
                os.remove(temp)
    return path


def write_tensors(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file written atomically (``write_atomically``): never pickle."""
    def write(temp: str) -> None:
        try:
            save_file(tensors, temp, metadata=metadata)
        except SafetensorError as error:  # the disk's errors come back as this, not as OSError
            raise OSError(re.sub(r"^Error while serializing: (I/O error: )?| \(os error \d+\)$", "", str(error))) from None

    return write_atomically(path, write)


def remove_orphans(path: Path) -> list[Path]:
    """Remove the temp files of ``path`` whose writing process is gone; returns them."""
    removed = []
    for temp in glob.glob(glob.escape(str(path.parent / f".{path.name}.")) + "*.tmp"):
        pid = Path(temp).name[len(path.name) + 2:].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                os.remove(temp)
                removed.append(Path(temp))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


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
