"""Fault injection: a run killed (SIGKILL) while it compresses, fine-tunes or saves, a disk that
fills up, a folder that refuses files or vanishes, two processes writing one path. In every case
no partial or corrupt file is left at the output path, a failure is one VQCError line, and a rerun
gives the very file an undisturbed run gives."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vqcompress as vqc
from vqcompress import atomic
from vqcompress.errors import VQCError

ROOT = Path(__file__).resolve().parents[1]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def run(out: Path, kill: str = "") -> None:
    """In a child process: a calibrated compression checkpointed after every stage, fine-tuning
    checkpointed every 4 steps, the save; with ``kill``, SIGKILL at that point: ``compress`` (in
    the second block), ``write`` (a checkpoint written whole but not yet renamed), ``finetune``
    (at step 9), ``save`` (the output written whole but not yet renamed)."""
    import importlib

    from tests.test_allocate import PLAN, text_batches, tiny_bert
    from vqcompress.finetune import finetune

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    compress_module, writes = importlib.import_module("vqcompress.compress"), []
    fit_runs, save_file = compress_module._fit_runs, atomic.save_file

    def fit_then_die(*args, **kwargs):
        writes.append("fit")
        if kill == "compress" and writes.count("fit") == 3:
            die()
        return fit_runs(*args, **kwargs)

    def save_then_die(tensors, temp, metadata=None):
        save_file(tensors, temp, metadata=metadata)
        if (kill == "write" and ".finetune." in temp) or (kill == "save" and f".{out.name}." in temp):
            die()

    compress_module._fit_runs, atomic.save_file = fit_then_die, save_then_die
    data = text_batches()

    def batch_at(step: int) -> dict:
        if kill == "finetune" and step == 9:
            die()
        return data.batch_at(step)

    model = vqc.compress(tiny_bert(), "kmeans", 3, data, plan=PLAN, progress=False, checkpoint=out.with_name(".partial"))
    finetune(model, tiny_bert(), data.task, batch_at, steps=12, lr=1e-3, checkpoint=out.with_name(".finetune"),
             checkpoint_every=4, progress=False)
    vqc.save(model, out)


def _child(out: Path, kill: str = "") -> subprocess.CompletedProcess:
    code = f"from tests.test_atomic import run; from pathlib import Path; run(Path({str(out)!r}), {kill!r})"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow  # six processes of a calibrated compression and fine-tuning: 50 s
def test_killed_at_every_stage_a_rerun_resumes_to_the_same_file(tmp_path):
    whole = tmp_path / "whole" / "m.vqc"
    whole.parent.mkdir()
    assert _child(whole).returncode == 0
    out = tmp_path / "killed" / "m.vqc"
    out.parent.mkdir()
    for kill in ("compress", "write", "finetune", "save"):
        result = _child(out, kill)
        assert result.returncode == -signal.SIGKILL, result.stderr
        assert not out.exists()  # nothing at the output path: never a partial file
    assert _leftovers(out.parent)  # the killed save's temp file …
    assert _child(out).returncode == 0
    assert out.read_bytes() == whole.read_bytes()
    assert not _leftovers(out.parent)  # … is removed by the next write of that path
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.vqc"]


def _killed_save(path: Path, when: str) -> subprocess.CompletedProcess:
    """``vqc.save`` in a child that SIGKILLs itself ``when`` "half" its file is written, or when it
    is "whole" but not yet renamed."""
    code = ("import os, signal, torch, vqcompress as vqc\n"
            "from vqcompress import atomic\n"
            "real = atomic.save_file\n"
            "def save(tensors, temp, metadata=None):\n"
            "    real(tensors, temp, metadata=metadata)\n"
            f"    if {when!r} == 'half':\n"
            "        os.truncate(temp, os.path.getsize(temp) // 2)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "atomic.save_file = save\n"
            "torch.manual_seed(0)\n"
            "m = vqc.compress(torch.nn.Sequential(torch.nn.Linear(256, 256)), 'kmeans', bits=4, progress=False)\n"
            f"vqc.save(m, {str(path)!r})\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_a_save_killed_at_any_point_leaves_no_file_and_the_next_save_cleans_up(tmp_path, model):
    path = tmp_path / "m.vqc"
    for when in ("half", "whole"):
        result = _killed_save(path, when)
        assert result.returncode == -signal.SIGKILL, result.stderr
        assert not path.exists()
    assert len(_leftovers(tmp_path)) == 1  # the second killed save removed the first one's
    assert vqc.save(model, path).read_bytes() == vqc.save(model, tmp_path / "alone.vqc").read_bytes()
    assert not _leftovers(tmp_path)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return vqc.compress(torch.nn.Sequential(torch.nn.Linear(256, 256)), "kmeans", bits=4, progress=False)


def _limited_save(path: Path, limit: int) -> subprocess.CompletedProcess:
    """``vqc.save`` in a child allowed files of at most ``limit`` bytes (a disk that fills up)."""
    def limit_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    code = ("import torch, vqcompress as vqc, sys\n"
            "from vqcompress.errors import VQCError\n"
            "torch.manual_seed(0)\n"
            "m = vqc.compress(torch.nn.Sequential(torch.nn.Linear(256, 256)), 'kmeans', bits=4, progress=False)\n"
            f"try:\n    vqc.save(m, {str(path)!r})\nexcept VQCError as e:\n    print(e); sys.exit(2)\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          preexec_fn=limit_files)


def test_a_disk_that_fills_up_leaves_the_old_file_and_says_so_in_one_line(tmp_path, model):
    path = vqc.save(model, tmp_path / "m.vqc")
    good = path.read_bytes()
    result = _limited_save(path, 4096)
    assert result.returncode == 2, result.stderr
    assert result.stdout.strip() == f"cannot write {path}: File too large"
    assert path.read_bytes() == good and not _leftovers(tmp_path)


def test_a_folder_that_refuses_files_is_one_line(model):
    with pytest.raises(VQCError, match="cannot write /proc/self/m.vqc"):
        vqc.save(model, "/proc/self/m.vqc")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_one_line(tmp_path, model):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(VQCError, match="Permission denied"):
            vqc.save(model, tmp_path / "m.vqc")
    finally:
        tmp_path.chmod(0o755)


def test_a_folder_that_vanishes_during_the_write(tmp_path, model, monkeypatch):
    folder = tmp_path / "out"
    save_file = atomic.save_file

    def then_vanish(tensors, temp, metadata=None):
        save_file(tensors, temp, metadata=metadata)
        shutil.rmtree(folder)

    monkeypatch.setattr(atomic, "save_file", then_vanish)
    with pytest.raises(VQCError, match="cannot write .*m.vqc"):
        vqc.save(model, folder / "m.vqc")
    assert not folder.exists()
    monkeypatch.setattr(atomic, "save_file", save_file)
    assert vqc.save(model, folder / "m.vqc").read_bytes() == vqc.save(model, tmp_path / "again.vqc").read_bytes()


def test_two_processes_writing_one_path_at_once_leave_one_whole_file(tmp_path, model):
    path = tmp_path / "m.vqc"
    code = ("import torch, vqcompress as vqc\n"
            "torch.manual_seed(0)\n"
            "m = vqc.compress(torch.nn.Sequential(torch.nn.Linear(256, 256)), 'kmeans', bits=4, progress=False)\n"
            f"for _ in range(30):\n    vqc.save(m, {str(path)!r})\n")
    writers = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT) for _ in range(2)]
    assert all(writer.wait(timeout=120) == 0 for writer in writers)
    assert path.read_bytes() == vqc.save(model, tmp_path / "alone.vqc").read_bytes()
    assert not _leftovers(tmp_path)


def test_a_temp_file_of_a_live_process_is_left_alone(tmp_path):
    mine = tmp_path / f".m.vqc.{os.getpid()}.abc.tmp"
    dead = tmp_path / ".m.vqc.999999999.abc.tmp"
    other = tmp_path / ".n.vqc.999999999.abc.tmp"
    for path in (mine, dead, other):
        path.write_bytes(b"half")
    assert atomic.remove_orphans(tmp_path / "m.vqc") == [dead]
    assert mine.exists() and other.exists()
