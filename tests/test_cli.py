"""The ``vqc`` command: user mistakes give one line on stderr, exit 2, and no output file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import vqcompress as vqc
from tests.conftest import TinyNet


def vqc_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vqcompress", *args], capture_output=True, text=True, timeout=300)


def assert_clean_failure(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert message in result.stderr


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    torch.manual_seed(0)
    return vqc.save(vqc.compress(TinyNet(), "kmeans", bits=2, progress=False), tmp_path_factory.mktemp("f") / "t.vqc")


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "nope", "--bits", "2"], "unknown method 'nope'"),
    (["--bits", "0"], "must be a positive, finite number"),
    (["--bits", "nan"], "must be a positive, finite number"),
    (["--bits", "inf"], "must be a positive, finite number"),
    (["--bits", "100"], "as small in fp16"),
    (["--bits", "0.01"], "cannot hold this model"),
    (["--bits", "0.01", "--data-free"], "fits 0.01 bits per weight"),
    (["--dim", "5", "--k", "16"], "d = 5 does not divide"),
    (["--dim", "4", "--k", "65536"], "exceed"),
    (["--method", "rtn", "--bits", "2.5", "--data-free"], "whole number of bits"),
    (["--bits", "2", "--include", "embeddings\\.LayerNorm"], "is a LayerNorm, which cannot be coded"),
    (["--method", "jlcm", "--bits", "2", "--calib", "no-such-file.txt"], "neither a file nor a corpus"),
    (["--method", "jlcm", "--bits", "2", "--calib-samples", "100000"], "fewer than the 100000 asked for"),
    (["--method", "jlcm", "--bits", "2", "-O", "gradient=newton"], "gradient must be one of"),
    (["--method", "jlcm", "--bits", "2", "-O", "steps"], "KEY=VALUE"),
])
def test_bad_input_fails_before_work(tmp_path, args, message):
    out = tmp_path / "out.vqc"
    result = vqc_cli("compress", "minilm", "-o", str(out), "--quiet", *args)
    assert_clean_failure(result, message)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_empty_calibration_file_fails_before_work(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    out = tmp_path / "out.vqc"
    result = vqc_cli("compress", "minilm", "-o", str(out), "--method", "jlcm", "--bits", "2", "--calib", str(empty))
    assert_clean_failure(result, "holds no text")
    assert not out.exists()


def test_not_a_model(tmp_path):
    assert_clean_failure(vqc_cli("compress", str(tmp_path), "-o", str(tmp_path / "o.vqc"), "--bits", "2"),
                         "neither a bundled model")


def test_inspect_bad_files(tmp_path, tiny_file):
    assert_clean_failure(vqc_cli("inspect", str(tmp_path / "missing.vqc")), "no such file")
    cut = tmp_path / "cut.vqc"
    cut.write_bytes(tiny_file.read_bytes()[:100])
    assert_clean_failure(vqc_cli("inspect", str(cut)), "truncated or corrupt")
    flipped = bytearray(tiny_file.read_bytes())
    flipped[-1] ^= 1
    (tmp_path / "flip.vqc").write_bytes(bytes(flipped))
    assert_clean_failure(vqc_cli("inspect", str(tmp_path / "flip.vqc")), "sha256")


def test_inspect_json(tiny_file):
    import json

    result = vqc_cli("inspect", str(tiny_file), "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["coded_layers"]) == 4


def test_plain_module_file_cannot_be_evaluated_without_its_model(tiny_file):
    assert_clean_failure(vqc_cli("eval", str(tiny_file)), "like=")


def test_cuda_asked_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert_clean_failure(vqc_cli("compress", "minilm", "-o", str(tmp_path / "o.vqc"), "--bits", "2", "--device", "cuda"),
                         "no CUDA device")


@pytest.fixture
def untrained_zoo(tmp_path, monkeypatch):
    """A zoo cache holding an untrained fashion-cnn: the CLI's wiring, without minutes of training."""
    from safetensors.torch import save_file

    from vqcompress.models.fashion import FashionCNN, checkpoint_path

    monkeypatch.setenv("VQC_CACHE", str(tmp_path / "cache"))
    path = checkpoint_path("fashion-cnn")
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    save_file(FashionCNN().state_dict(), str(path))
    return tmp_path


def test_zoo_model_compresses_fine_tunes_and_evaluates(untrained_zoo):
    out = untrained_zoo / "cnn.vqc"
    result = vqc_cli("compress", "fashion-cnn", "--method", "vqdnn", "--bits", "1", "--finetune-steps", "3",
                     "-o", str(out), "--quiet", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["coded_bits_per_weight"] < 1.1
    assert not list(untrained_zoo.glob(".*finetune*"))  # the checkpoint is gone once training completes
    evaluated = vqc_cli("eval", str(out), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert set(json.loads(evaluated.stdout)["compressed"]) == {"accuracy"}
    tuned = untrained_zoo / "tuned.vqc"
    result = vqc_cli("finetune", str(out), "-o", str(tuned), "--steps", "2", "--quiet", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["coded_bits_per_weight"] < 1.1
    assert tuned.read_bytes() != out.read_bytes()  # the codebooks moved …
    assert vqc.report(tuned).coded_bits == vqc.report(out).coded_bits  # … the sizes did not
    assert not list(untrained_zoo.glob(".*finetune*"))
    from safetensors.torch import save_file

    from vqcompress.models.fashion import FashionCNN, checkpoint_path

    torch.manual_seed(1)
    save_file(FashionCNN().state_dict(), str(checkpoint_path("fashion-cnn")))  # other weights than the file's source
    assert_clean_failure(vqc_cli("finetune", str(out), "-o", str(tuned), "--steps", "1"), "differ from those")


def test_rtn_codes_convolutions_of_any_width_and_the_output_says_what_is_left_dense(untrained_zoo):
    """A 3×3 convolution over 16 channels has 144 inputs, which rtn's default group of 64 does not
    divide: it takes 48, and says so in its recipe line; the two layers too small are listed."""
    out = untrained_zoo / "rtn.vqc"
    result = vqc_cli("compress", "fashion-cnn", "--method", "rtn", "--bits", "8", "-o", str(out), "--quiet", "--data-free")
    assert result.returncode == 0, result.stderr
    assert "2 layer(s): method=rtn, bits=8, group_size=48" in result.stdout
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("left dense: 2 tensor(s), "))
    assert [line.split(" (")[0] for line in lines[start + 1:start + 3]] == ["  features.0.0", "  head.5"]
    assert all(line.endswith("too small (under 4,096 weights)") for line in lines[start + 1:start + 3])
    result = vqc_cli("compress", "fashion-cnn", "--method", "rtn", "--bits", "8", "-o", str(out), "--quiet", "--data-free",
                     "--json")
    assert [entry["name"] for entry in json.loads(result.stdout)["left_dense"]] == ["features.0.0", "head.5"]


def test_finetune_refuses_what_it_cannot_train(tmp_path, tiny_file):
    assert_clean_failure(vqc_cli("finetune", str(tmp_path / "none.vqc"), "-o", str(tmp_path / "o.vqc"), "--steps", "1"),
                         "none.vqc")
    assert_clean_failure(vqc_cli("finetune", str(tiny_file), "-o", str(tmp_path / "o.vqc"), "--steps", "1"),
                         "made from a plain module")
    assert not (tmp_path / "o.vqc").exists()


def test_vqdnn_without_fine_tuning_is_refused(untrained_zoo):
    result = vqc_cli("compress", "fashion-cnn", "--method", "vqdnn", "--bits", "1", "--finetune-steps", "0",
                     "-o", str(untrained_zoo / "x.vqc"))
    assert_clean_failure(result, "learns its codebooks in training")


def test_untrained_zoo_model_is_not_a_silent_multi_minute_surprise(tmp_path, monkeypatch):
    monkeypatch.setenv("VQC_CACHE", str(tmp_path))
    corrupt = tmp_path / "zoo" / "fashion-vit-seed0.safetensors"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"not a checkpoint")
    assert_clean_failure(vqc_cli("compress", "fashion-vit", "--bits", "1", "-o", str(tmp_path / "v.vqc")), "corrupt")


def test_codebook_build_inspect_and_vq4all_errors(tmp_path):
    """A universal codebook from the bundled MiniLM: built, inspected, drawn; a corrupt one refused."""
    book = tmp_path / "u.vqcb"
    built = vqc_cli("codebook", "build", "minilm", "-o", str(book), "--samples", "256", "--k", "64")
    assert built.returncode == 0, built.stderr
    shown = vqc_cli("codebook", "inspect", str(book), "--json", "--png", str(tmp_path / "u.png"))
    info = json.loads(shown.stdout[:shown.stdout.rindex("}") + 1])
    assert info["k"] == 64 and info["dim"] == 4 and info["sources"][0]["model"] == "minilm"
    assert (tmp_path / "u.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "bad.vqcb").write_bytes(book.read_bytes()[:50])
    assert_clean_failure(vqc_cli("codebook", "inspect", str(tmp_path / "bad.vqcb")), "not a readable codebook")
    out = tmp_path / "m.vqc"
    assert_clean_failure(vqc_cli("compress", "minilm", "-o", str(out), "--method", "vq4all", "--codebook",
                                 str(tmp_path / "bad.vqcb")), "not a readable codebook")
    assert_clean_failure(vqc_cli("compress", "minilm", "-o", str(out), "--method", "vq4all", "--codebook", str(book),
                                 "--bits", "1"), "cannot hold this model")
    assert not out.exists()


def test_keep_rows_goes_to_the_token_embeddings_larger_than_it():
    from torch import nn

    from vqcompress.cli import kept_rows_plan

    model = nn.ModuleDict({"words": nn.Embedding(1000, 8), "positions": nn.Embedding(64, 8), "mix": nn.Linear(8, 8)})
    assert kept_rows_plan(model, 64) == {"words": {"keep_rows": 64}}
    assert kept_rows_plan(model, 0) == {"words": {"keep_rows": 0}}  # named: no default keeps rows there
    assert kept_rows_plan(model, None) == {}


def test_layer_options_become_plan_entries_and_bad_ones_fail_in_one_line():
    from vqcompress.cli import layer_plan
    from vqcompress.errors import VQCError

    assert layer_plan(["model\\.embed_tokens:bits=4,method=kmeans", "model\\.embed_tokens:k=16"]) == {
        "model\\.embed_tokens": {"bits": 4, "method": "kmeans", "k": 16}}
    assert layer_plan(["lm_head:bits=3.5,dim=2"]) == {"lm_head": {"bits": 3.5, "dim": 2}}
    for bad, message in [("no-colon", "NAME_REGEX:KEY=VALUE"), ("x:", "NAME_REGEX:KEY=VALUE"),
                         ("x:bits", "--layer takes KEY=VALUE"), ("(:bits=2", "not a regular expression")]:
        with pytest.raises(VQCError, match=message):
            layer_plan([bad])


def test_the_demo_runs_its_commands_as_a_user_types_them(tmp_path):
    """Each of the demo's commands parses with every option at its default (none left unset)."""
    import typer.main

    from vqcompress.cli import app, demo_commands

    group = typer.main.get_command(app)
    for command in demo_commands(tmp_path / "demo.vqc", "cpu"):
        context = group.commands[command[0]].make_context(command[0], command[1:])
        assert not any(type(value).__name__ == "OptionInfo" for value in context.params.values()), context.params


def test_a_sentence_encoder_folder_whose_config_names_a_masked_lm(tmp_path, tiny_masked_lm_folder):
    """Its head would be random (the folder holds no weights for it) and was coded; the run then ended
    in an AttributeError, ``-O lr=`` in a TypeError; ``vqc eval`` had no default suite."""
    out = tmp_path / "st.vqc"
    result = vqc_cli("compress", str(tiny_masked_lm_folder), "--method", "jlcm", "--bits", "3", "-O", "lr=0.05",
                     "--calib-samples", "64", "-o", str(out), "--quiet", "--json")
    assert result.returncode == 0, result.stderr
    assert "loaded the base model, BertModel" in result.stderr
    assert all("lr=0.05" in line for line in json.loads(result.stdout)["settings"])
    assert out.stat().st_size * 8 / json.loads(result.stdout)["parameters"] <= 3
    evaluated = vqc_cli("eval", str(out), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["suite"] == "similarity"


@pytest.mark.parametrize("where", ["folder", "read-only", "proc"])
def test_an_output_that_cannot_be_written_fails_before_any_work(tmp_path, where):
    output = {"folder": tmp_path, "read-only": tmp_path / "ro" / "m.vqc", "proc": "/proc/m.vqc"}[where]
    if where == "read-only":
        (tmp_path / "ro").mkdir(mode=0o555)
        if os.access(tmp_path / "ro", os.W_OK):  # root writes anywhere: take a file where a folder should be
            (tmp_path / "ro").rmdir()
            (tmp_path / "ro").write_text("a file")
    result = vqc_cli("compress", "minilm", "--bits", "2", "-o", str(output))
    assert_clean_failure(result, "m.vqc" if where != "folder" else "is a folder")
    assert "loading" not in result.stderr


def test_an_interrupted_run_says_what_it_keeps_and_how_big(tmp_path, caplog):
    """A Ctrl-C'd jlcm run left a hidden 44.9 MB .partial file beside the output; now every kept
    checkpoint is named with its size (and SIGTERM takes the same way: ``cli.main``)."""
    import logging
    import signal

    from vqcompress import cli

    output = tmp_path / "m.vqc"
    (tmp_path / ".m.vqc.partial").write_bytes(b"\0" * (3 << 20))
    (tmp_path / ".m.vqc.partial.finetune").write_bytes(b"\0" * (1 << 20))
    (tmp_path / ".m.vqc.partial.123.abc.tmp").write_bytes(b"half")
    with caplog.at_level(logging.WARNING, logger="vqcompress"), pytest.raises(KeyboardInterrupt):
        with cli._said_if_interrupted(output):
            signal.default_int_handler(signal.SIGTERM, None)
    assert [record.getMessage().split(" (")[0] for record in caplog.records] == [
        f"interrupted: the work so far is kept in {tmp_path / '.m.vqc.partial'}",
        f"interrupted: the work so far is kept in {tmp_path / '.m.vqc.partial.finetune'}"]
    assert "a hidden file, 3.0 MiB" in caplog.records[0].getMessage()
