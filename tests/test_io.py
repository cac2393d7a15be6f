"""The .vqc file: round trips bit for bit, and every kind of bad file fails with a clear VQCError."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import struct
import zlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import vqcompress as vqc
from tests.conftest import TinyNet
from vqcompress import atomic, io
from vqcompress.errors import VQCError


@pytest.fixture
def saved(tmp_path, tiny, tiny_inputs):
    model = vqc.compress(tiny, "kmeans", bits=2, progress=False)
    path = vqc.save(model, tmp_path / "tiny.vqc")
    with torch.no_grad():
        expected = model(*tiny_inputs)
    return path, expected


def test_save_load_reproduces_outputs_bit_for_bit(saved, tiny_inputs):
    path, expected = saved
    torch.manual_seed(123)  # a skeleton with other random weights: everything must come from the file
    model = vqc.load(path, like=TinyNet())
    with torch.no_grad():
        assert torch.equal(model(*tiny_inputs), expected)


def test_same_inputs_same_seed_same_file(tmp_path, tiny_inputs):
    files = []
    for name in ("a.vqc", "b.vqc"):
        torch.manual_seed(0)
        files.append(vqc.save(vqc.compress(TinyNet(), "kmeans", bits=2, progress=False), tmp_path / name).read_bytes())
    assert files[0] == files[1]


def test_no_pickle_only_safetensors(saved):
    path, _ = saved
    with safe_open(str(path), framework="pt") as handle:  # a plain safetensors reader opens it
        assert io.ZLIB_KEY in handle.metadata() and io.PACKED in handle.keys()
    manifest = io.read_manifest(path)[0]
    assert manifest["format"] == "vqc" and manifest["format_version"] == io.FORMAT_VERSION
    assert set(manifest["layers"]) == {"embed", "conv1", "conv2", "head"}


def test_small_tensors_are_packed_and_the_header_is_small(saved):
    """fashion-vit's 4-bit file was 28 KB of header (175 table entries, a 10 KB manifest) for 73 KB
    of tensors: its coded layers were left 1.5 bits per weight."""
    path, _ = saved
    manifest, shapes = io.read_manifest(path)
    with safe_open(str(path), framework="pt") as handle:
        stored = set(handle.keys())
    small = {name for name, (dtype, shape) in shapes.items() if io.DTYPE_BYTES[dtype] * math.prod(shape) < io.PACK_BELOW}
    assert small and not small & stored
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    assert header < len(json.dumps(manifest, separators=(",", ":")))  # the old header was that and a table


def test_missing_file(tmp_path):
    with pytest.raises(VQCError, match="no such file"):
        vqc.load(tmp_path / "nope.vqc", like=TinyNet())


def test_truncated_file(saved, tmp_path):
    path, _ = saved
    cut = tmp_path / "cut.vqc"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(VQCError, match="truncated or corrupt"):
        vqc.load(cut, like=TinyNet())


def test_tampered_payload(saved, tmp_path):
    path, _ = saved
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # a byte of tensor data, header untouched
    bad = tmp_path / "bad.vqc"
    bad.write_bytes(bytes(data))
    with pytest.raises(VQCError, match="sha256"):
        vqc.load(bad, like=TinyNet())


def _rewrite_manifest(path, target, change) -> None:
    tensors, manifest = io.read(path)
    change(manifest)
    io.write(target, tensors, manifest)


def test_unknown_format_version(saved, tmp_path):
    path, _ = saved
    _rewrite_manifest(path, tmp_path / "v99.vqc", lambda m: m.update(format_version=99))
    with pytest.raises(VQCError, match="format version 99"):
        vqc.load(tmp_path / "v99.vqc", like=TinyNet())


def test_plain_safetensors_is_not_vqc(tmp_path):
    save_file({"x": torch.zeros(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(VQCError, match="not a .vqc file"):
        vqc.load(tmp_path / "plain.safetensors", like=TinyNet())


def test_header_garbage(tmp_path):
    (tmp_path / "junk.vqc").write_bytes(struct.pack("<Q", 40) + b"{not json" + b"\0" * 40)
    with pytest.raises(VQCError):
        vqc.report(tmp_path / "junk.vqc")


def _edit_stored_manifest(path, target, change) -> None:
    """Rewrite the file's compressed manifest as it is stored (its ``packed`` list included)."""
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        stored = json.loads(zlib.decompress(base64.b85decode(handle.metadata()[io.ZLIB_KEY])))
    change(stored)
    text = base64.b85encode(zlib.compress(json.dumps(stored).encode())).decode()
    save_file(tensors, str(target), metadata={io.ZLIB_KEY: text})


@pytest.mark.parametrize("change", [
    lambda m: m["packed"][0].__setitem__(1, "Q7"),  # no such dtype
    lambda m: m["packed"][0].__setitem__(2, [-1]),
    lambda m: m["packed"].reverse(),  # a wider tensor at an odd offset
    lambda m: m["packed"].pop(),  # bytes left over
    lambda m: m.__setitem__("packed", {"a": 1}),
])
def test_an_edited_list_of_packed_tensors_is_refused_in_words(saved, tmp_path, change):
    path, _ = saved
    _edit_stored_manifest(path, tmp_path / "edited.vqc", change)
    with pytest.raises(VQCError, match="corrupt|misplaced|sha256"):
        vqc.load(tmp_path / "edited.vqc", like=TinyNet())


def test_a_version_3_file_still_loads(saved, tmp_path, tiny_inputs):
    """Version 3 stored every tensor under its own name and the manifest as plain JSON."""
    path, expected = saved
    tensors, manifest = io.read(path)
    save_file(tensors, str(tmp_path / "v3.vqc"), metadata={"vqcompress": json.dumps({**manifest, "format_version": 3})})
    with torch.no_grad():
        assert torch.equal(vqc.load(tmp_path / "v3.vqc", like=TinyNet())(*tiny_inputs), expected)


def test_shape_mismatch_on_load(saved):
    path, _ = saved
    other = TinyNet()
    other.head = torch.nn.Linear(96, 64)
    with pytest.raises(VQCError, match="shape mismatch at head"):
        vqc.load(path, like=other)


def test_missing_layer_on_load(saved):
    path, _ = saved
    other = TinyNet()
    del other.conv2
    with pytest.raises(VQCError, match="no layer 'conv2'"):
        vqc.load(path, like=other)


def test_plain_module_file_needs_like(saved):
    path, _ = saved
    with pytest.raises(VQCError, match="like="):
        vqc.load(path)


def test_interrupted_save_leaves_nothing(tmp_path, tiny, monkeypatch):
    model = vqc.compress(tiny, "kmeans", bits=2, progress=False)

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "save_file", explode)
    with pytest.raises(KeyboardInterrupt):
        vqc.save(model, tmp_path / "half.vqc")
    assert list(tmp_path.iterdir()) == []


def test_tied_weights_are_stored_once(tmp_path, tiny_inputs):
    model = TinyNet()
    model.tied = torch.nn.Linear(64, 256, bias=False)
    model.tied.weight = model.embed.weight  # tied like an LM head, left dense by this plan
    compressed = vqc.compress(model, "kmeans", bits=2, plan=vqc.Plan(by_name={"embed|tied": None}), progress=False)
    path = vqc.save(compressed, tmp_path / "tied.vqc")
    with safe_open(str(path), framework="pt") as handle:
        assert len([k for k in handle.keys() if k in ("embed.weight", "tied.weight")]) == 1
    skeleton = TinyNet()
    skeleton.tied = torch.nn.Linear(64, 256, bias=False)
    loaded = vqc.load(path, like=skeleton)
    assert torch.equal(loaded.tied.weight, compressed.embed.weight)
    assert torch.equal(loaded.tied.weight, loaded.embed.weight)


def test_kept_rows_codes_are_left_out_of_the_file_and_the_model_comes_back(tmp_path, tiny_inputs):
    """A kept row's codes are never read: the file is smaller by them, the report counts the file
    exactly, and the loaded model gives the same outputs bit for bit."""
    torch.manual_seed(0)
    plain = vqc.compress(TinyNet(), "kmeans", bits=2, progress=False)
    torch.manual_seed(0)
    kept = vqc.compress(TinyNet(), "kmeans", bits=2, plan=vqc.Plan(by_name={"embed": {"keep_rows": 40}}), progress=False)
    plain_path, path = vqc.save(plain, tmp_path / "plain.vqc"), vqc.save(kept, tmp_path / "kept.vqc")
    layout = kept.embed.weight_code.layout
    codes, plain_codes = (io.read(p)[0]["embed.weight_code.codes"] for p in (path, plain_path))
    assert codes.numel() * 8 == layout.stream_bits()["codes"] and codes.numel() < plain_codes.numel()
    assert vqc.report(path).total_bits == vqc.report(kept).total_bits
    with torch.no_grad():
        expected = kept(*tiny_inputs)
        assert torch.equal(vqc.load(path, like=TinyNet())(*tiny_inputs), expected)


def test_a_version_1_file_with_kept_rows_codes_still_loads(tmp_path, tiny_inputs):
    """Version 1 stored every row's codes, kept rows' too: such a file still reads the same."""
    torch.manual_seed(0)
    model = vqc.compress(TinyNet(), "kmeans", bits=2, plan=vqc.Plan(by_name={"embed": {"keep_rows": 40}}), progress=False)
    tensors, aliases = io.model_tensors(model)
    tensors["embed.weight_code.codes"] = model.embed.weight_code.codes.clone()
    manifest = {**io.manifest_of(model, tensors, aliases), "format_version": 1}
    for name, entry in manifest["layers"].items():  # version 1 listed every field of a layout
        entry["layout"] = dataclasses.asdict(model.get_submodule(name).weight_code.layout)
    save_file(tensors, str(tmp_path / "v1.vqc"), metadata={"vqcompress": json.dumps(manifest)})
    with torch.no_grad():
        assert torch.equal(vqc.load(tmp_path / "v1.vqc", like=TinyNet())(*tiny_inputs), model(*tiny_inputs))


def test_a_manifest_whose_layout_does_not_fit_the_kept_rows_codes_is_refused(tmp_path):
    """A layout edited (and the file's hashes made again) must still fail in words."""
    torch.manual_seed(0)
    model = vqc.compress(TinyNet(), "kmeans", bits=2, plan=vqc.Plan(by_name={"embed": {"keep_rows": 40}}), progress=False)
    path = vqc.save(model, tmp_path / "kept.vqc")
    _rewrite_manifest(path, tmp_path / "edited.vqc", lambda m: m["layers"]["embed"]["layout"].update(k=256))
    with pytest.raises(VQCError, match=r"layers/embed: tensor embed\.weight_code\.\w+ is .* they do not match"):
        vqc.load(tmp_path / "edited.vqc", like=TinyNet())


def test_a_version_2_file_without_the_kept_rows_dtype_reads_them_as_fp16(tmp_path, tiny_inputs):
    """Files written before ``kept_dtype`` existed kept their rows in fp16 and do not say so."""
    torch.manual_seed(0)
    model = vqc.compress(TinyNet(), "kmeans", bits=2, progress=False)
    code = model.embed.weight_code
    code.keep_rows(model.embed.weight_code.decode(), torch.arange(0, 80, 2), "float16")
    tensors, aliases = io.model_tensors(model)
    manifest = {**io.manifest_of(model, tensors, aliases), "format_version": 2}
    del manifest["layers"]["embed"]["layout"]["kept_dtype"]
    save_file(tensors, str(tmp_path / "v2.vqc"), metadata={"vqcompress": json.dumps(manifest)})
    assert io.read_manifest(tmp_path / "v2.vqc")[0]["layers"]["embed"]["layout"]["kept_dtype"] == "float16"
    with torch.no_grad():
        assert torch.equal(vqc.load(tmp_path / "v2.vqc", like=TinyNet())(*tiny_inputs), model(*tiny_inputs))


def test_a_permutation_of_more_than_65536_rows_is_saved_loaded_and_counted(tmp_path):
    """jlcm groups an embedding's rows by a stored permutation: 70,000 rows need 17-bit row numbers
    (Gemma's 262,144, 18), which the file holds, the report counts and a fresh model reads back."""
    torch.manual_seed(0)
    model = vqc.compress(torch.nn.Sequential(torch.nn.Embedding(70000, 4)), "jlcm", bits=1, steps=0, progress=False)
    code = model[0].weight_code
    assert code.layout.permuted and code.perm.numel() == (70000 * 17 + 7) // 8
    path = vqc.save(model, tmp_path / "rows.vqc")
    assert io.read_manifest(path)[0]["format_version"] >= 3  # readers of 2 stop at 16 bits
    assert vqc.report(path).total_bits == vqc.report(model).total_bits == code.nbits()
    loaded = vqc.load(path, like=torch.nn.Sequential(torch.nn.Embedding(70000, 4)))
    assert torch.equal(loaded[0].weight_code.permutation(), code.permutation())
    ids = torch.tensor([[0, 65535, 65536, 69999]])
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_a_file_of_one_bare_layer_loads_like_one(tmp_path):
    """``load(path, like=nn.Linear(…))`` ended in "Cannot set the submodule without a target name"."""
    torch.manual_seed(0)
    layer = vqc.compress(torch.nn.Linear(128, 64), "kmeans", bits=4, progress=False)
    loaded = vqc.load(vqc.save(layer, tmp_path / "one.vqc"), like=torch.nn.Linear(128, 64))
    x = torch.randn(3, 128)
    with torch.no_grad():
        assert torch.equal(loaded(x), layer(x))
