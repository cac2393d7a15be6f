"""A model folder from a stranger: its config.json is checked against the schema and against its
weights before anything is built, and nothing in it is ever unpickled."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from vqcompress.errors import VQCError
from vqcompress.models import load_model


@pytest.fixture
def folder(tmp_path, tiny_masked_lm_folder):
    return shutil.copytree(tiny_masked_lm_folder, tmp_path / "model")


def _edit_config(folder, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_a_folder_loads(folder):
    assert type(load_model(str(folder))[0]).__name__ == "BertModel"


@pytest.mark.parametrize("change, match", [
    (lambda c: c.update(num_hidden_layers=5000), "claims 5000 layers"),
    (lambda c: c.update(vocab_size=10**9), "makes a model of"),
    (lambda c: c.update(vocab_size=1e9), "does not build its model"),
    (lambda c: c.update(architectures="BertModel"), "architectures must be a list"),
    (lambda c: c.update(model_type=7), "model_type must be str"),
])
def test_a_config_that_does_not_fit_its_weights_is_refused_before_anything_is_built(folder, change, match):
    _edit_config(folder, change)
    started = time.perf_counter()
    with pytest.raises(VQCError, match=match):
        load_model(str(folder))
    assert time.perf_counter() - started < 5


def test_a_config_that_is_not_json_is_one_line(folder):
    (folder / "config.json").write_text("{not json")
    with pytest.raises(VQCError, match="config.json is not readable JSON"):
        load_model(str(folder))


def test_pickled_weights_are_never_read(folder):
    """transformers would ``torch.load`` a pytorch_model.bin: pickle, which runs what the file says."""
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 anything")
    with pytest.raises(VQCError, match="only pytorch_model.bin .*never unpickles"):
        load_model(str(folder))
