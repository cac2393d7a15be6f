"""The real thing: MiniLM compressed by the ``vqc`` command, inspected, reloaded, run, decompressed."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

import vqcompress as vqc
from tests.test_cli import vqc_cli
from vqcompress.models import load_model
from vqcompress.source import source_of


@pytest.fixture(scope="module")
def minilm_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("minilm") / "minilm-2bit.vqc"
    # unscaled: kmeans' default row scales (0.04 bits per weight here) put the file at 2.124 bits per weight
    result = vqc_cli("compress", "minilm", "--method", "kmeans", "--bits", "2", "--data-free", "--scale", "none",
                     "-o", str(path), "--quiet", "--json")
    assert result.returncode == 0, result.stderr
    return path, json.loads(result.stdout)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(1000, 29000, (2, 24), generator=torch.Generator().manual_seed(0))


def test_two_bits_whole_model_measured_from_the_file(minilm_file):
    path, result = minilm_file
    assert result["settings"] == ["39 layer(s): method=kmeans, dim=4, k=256, scale=none, groups=1, iterations=20, "
                                  "max_points_per_centroid=256, shared=0"]
    assert result["parameters"] == 22_713_216
    assert path.stat().st_size * 8 / result["parameters"] <= 2.1
    assert abs(result["total_bytes"] / path.stat().st_size - 1) < 0.01


def test_reload_is_bit_for_bit_and_lut_agrees(minilm_file, ids):
    path, _ = minilm_file
    model = vqc.load(path)  # rebuilt from the source recorded in the file
    again = vqc.load(path, like=load_model("minilm")[0])
    with torch.inference_mode():
        decoded = model(input_ids=ids).last_hidden_state
        assert torch.equal(again(input_ids=ids).last_hidden_state, decoded)
        vqc.set_forward_path(model, "lut")
        assert torch.allclose(model(input_ids=ids).last_hidden_state, decoded, atol=1e-4)


@pytest.fixture(scope="module")
def dense_folder(minilm_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("dense") / "minilm-dense"
    result = vqc_cli("decompress", str(minilm_file[0]), "-o", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_decompressed_folder_loads_in_transformers(minilm_file, dense_folder, ids):
    path, _ = minilm_file
    out = dense_folder
    dense = AutoModel.from_pretrained(str(out)).eval()
    assert (out / "tokenizer.json").is_file()
    with torch.inference_mode():
        expected = vqc.load(path)(input_ids=ids).last_hidden_state
        assert torch.allclose(dense(input_ids=ids).last_hidden_state, expected, atol=1e-5)
    assert_second = vqc_cli("decompress", str(path), "-o", str(out))
    assert assert_second.returncode == 2 and "not empty" in assert_second.stderr


def test_eval_runs_the_minilm_suite(minilm_file):
    path, _ = minilm_file
    result = vqc_cli("eval", str(path), "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert abs(figures["fp32"]["lee"] - 0.508) < 0.01
    assert 0.3 < figures["compressed"]["cosine"] < 1.0


def test_any_model_folder_compresses(dense_folder, tmp_path):
    out = tmp_path / "folder-rtn.vqc"
    result = vqc_cli("compress", str(dense_folder), "--method", "rtn", "--bits", "4", "--data-free", "-o", str(out),
                     "--quiet", "--json")
    assert result.returncode == 0, result.stderr
    assert 4.4 < json.loads(result.stdout)["coded_bits_per_weight"] < 4.6  # 4 bits + 32 / 64 for scale and offset
    assert source_of(vqc.load(out)).kind == "folder"


def test_nan_weights_refused_with_no_output(dense_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(dense_folder, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    name = next(n for n in tensors if n.endswith("intermediate.dense.weight"))
    tensors[name][3, 5] = float("nan")
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "never.vqc"
    result = vqc_cli("compress", str(broken), "--bits", "2", "-o", str(out), "--quiet")
    assert result.returncode == 2 and "NaN or Inf" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
