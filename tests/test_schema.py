"""The manifest's schema: the edits a fuzzer of 3,000 mutations found (issue 33) each fail in one
line naming the field, never another exception, a huge allocation or a silently changed model."""

from __future__ import annotations

import base64
import json
import time
import zlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import vqcompress as vqc
from tests.conftest import TinyNet
from vqcompress import cli, io, schema
from vqcompress.errors import VQCError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = vqc.compress(TinyNet().eval(), "kmeans", bits=2, progress=False)
    return vqc.save(model, tmp_path_factory.mktemp("schema") / "tiny.vqc")


def _edited(path, target, change):
    """The file with its manifest changed and written again through ``io.write``: its hashes made
    anew, as a deliberate editor would, so only the schema stands in the way."""
    tensors, manifest = io.read(path)
    change(manifest)
    return io.write(target, tensors, manifest)


def _edited_in_place(path, target, change):
    """The file with its stored manifest changed and nothing else: its old sha256 kept."""
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        stored = json.loads(zlib.decompress(base64.b85decode(handle.metadata()[io.ZLIB_KEY])))
    change(stored)
    save_file(tensors, str(target), metadata={io.ZLIB_KEY: base64.b85encode(zlib.compress(json.dumps(stored).encode())).decode()})
    return target


def _everything_fails(path, match: str) -> None:
    """``load``, ``report`` and ``vqc inspect`` (both forms) each raise a VQCError matching ``match``."""
    for action in (lambda: vqc.load(path, like=TinyNet()), lambda: vqc.report(path),
                   lambda: cli.inspect(path, json_out=False), lambda: cli.inspect(path, json_out=True)):
        with pytest.raises(VQCError, match=match):
            action()


def _layer(name):
    return lambda m: m["layers"][name]


@pytest.mark.parametrize("change, match", [
    (lambda m: _layer("head")(m)["layout"].update(codebook_dtype="uint8"), "codebooks and scales are stored as"),
    (lambda m: _layer("head")(m)["layout"].update(codebook_dtype="int8"), "codebooks and scales are stored as"),
    (lambda m: _layer("head")(m)["args"].update(out_features=2147483648), "layers/head/args make a weight of"),
    (lambda m: _layer("head")(m)["args"].update(device="cpu"), "layers/head/args/device is not an argument of a Linear"),
    (lambda m: _layer("head")(m)["layout"].update(k="256"), "layers/head/layout/k must be an integer"),
    (lambda m: _layer("head")(m)["layout"].update(shape=[128, 0]), "layers/head/layout/shape/1 must be an integer ≥ 1"),
    (lambda m: _layer("head")(m)["layout"].update(groups=True), "layers/head/layout/groups must be an integer"),
    (lambda m: _layer("head")(m)["layout"].update(colour=1), "layers/head/layout/colour is not a field"),
    (lambda m: _layer("head")(m)["layout"].pop("dim"), "layers/head/layout/dim is missing"),
    (lambda m: _layer("head")(m).pop("recipe"), "layers/head/recipe is missing"),
    (lambda m: _layer("head")(m).update(recipe=[1]), "layers/head/recipe must be dict"),
    (lambda m: _layer("head")(m).update(extra={}), "layers/head/extra is not a field"),
    (lambda m: m.update(layers=[]), "layers must be dict"),
    (lambda m: m.update(aliases={"x": "nowhere"}), "aliases/x must name a stored tensor"),
    (lambda m: m["source"].update(kind=3), "source/kind must be str"),
    (lambda m: _layer("head")(m)["layout"].update(k=63), "tensor head.weight_code.codebook is F16 \\[1, 64, 3\\]"),
    (lambda m: _layer("head")(m)["layout"].update(scale_group=3), "tensor head.weight_code.scale is F16 \\[128, 1\\]"),
    (lambda m: _layer("head")(m).update(rotation={"kind": "hadamard", "seed": 2**70, "rows": True}),
     "rotation/seed must be an integer"),
], ids=range(18))
def test_an_edited_manifest_fails_in_one_line_naming_the_field(saved, tmp_path, change, match):
    _everything_fails(_edited(saved, tmp_path / "edited.vqc", change), match)


@pytest.mark.parametrize("change", [
    lambda m: _layer("conv2")(m)["args"].update(padding=[3, 3]),
    lambda m: _layer("conv1")(m)["args"].update(stride=[2]),
    lambda m: _layer("conv1")(m)["args"].update(dilation=[2]),
])
def test_a_file_never_overrides_the_models_convolution_settings(saved, tmp_path, change):
    """Edits of a conv's padding, stride or dilation overrode the ``like=`` module."""
    with pytest.raises(VQCError, match="in the file but .* in the model"):
        vqc.load(_edited(saved, tmp_path / "edited.vqc", change), like=TinyNet())


def test_an_edit_without_new_hashes_is_caught_by_the_manifest_hash(saved, tmp_path):
    edited = _edited_in_place(saved, tmp_path / "edited.vqc",
                              lambda m: _layer("head")(m)["layout"].update(codebook_dtype="float32"))
    _everything_fails(edited, "its manifest does not match its sha256")


def test_a_huge_claimed_layer_allocates_nothing(saved, tmp_path):
    """``out_features = 2147483648`` grew the loader past 6 GiB; a layout to match is refused by its size."""
    def grow(manifest):
        _layer("head")(manifest)["args"].update(out_features=2147483648)
        _layer("head")(manifest)["layout"].update(shape=[2147483648, 96])

    started = time.perf_counter()
    _everything_fails(_edited(saved, tmp_path / "huge.vqc", grow), "head")
    assert time.perf_counter() - started < 5


def test_older_versions_are_checked_as_strictly(saved, tmp_path):
    tensors, manifest = io.read(saved)
    manifest = {**manifest, "format_version": 4}
    manifest["layers"]["head"]["layout"]["codebook_dtype"] = "uint8"
    save_file(tensors, str(tmp_path / "v3.vqc"), metadata={"vqcompress": json.dumps({**manifest, "format_version": 3})})
    with pytest.raises(VQCError, match="codebooks and scales are stored as"):
        vqc.load(tmp_path / "v3.vqc", like=TinyNet())


@pytest.fixture(scope="module")
def bert_file(tmp_path_factory):
    """A small BERT compressed as a plain module: its file rebuilds it from the recorded config."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=64)
    model = vqc.compress(BertModel(config).eval(), "kmeans", bits=4, progress=False)
    return vqc.save(model, tmp_path_factory.mktemp("bert") / "bert.vqc")


def test_a_file_rebuilds_its_transformers_model_from_its_config(bert_file):
    assert type(vqc.load(bert_file)).__name__ == "BertModel"


@pytest.mark.parametrize("change, match", [
    ({"num_hidden_layers": 5000}, "claims 5000 layers"),
    ({"vocab_size": 1e9}, "does not build its model"),
    ({"vocab_size": 10**9}, "makes a model of"),
    ({"hidden_size": "wide"}, "does not build its model"),
])
def test_a_source_config_larger_than_the_file_is_refused_before_it_is_built(bert_file, tmp_path, change, match):
    """MiniLM's ``num_hidden_layers = 5000`` took the loader to 8 GiB in 161 s; ``vocab_size = 1e9``
    ended in an allocator traceback."""
    edited = _edited(bert_file, tmp_path / "edited.vqc", lambda m: m["source"]["config"].update(change))
    started = time.perf_counter()
    with pytest.raises(VQCError, match=match):
        vqc.load(edited)
    assert time.perf_counter() - started < 5


def test_the_schema_names_the_path_of_a_nested_field():
    with pytest.raises(VQCError, match="here: a/b/1 must be an integer ≥ 0"):
        schema.check(schema.record({"a": schema.record({"b": schema.listing(schema.integer())})}), {"a": {"b": [1, -1]}},
                     "here")


def _payload_edited(path, target, change):
    """The file with its tensors changed and its hashes made anew."""
    tensors, manifest = io.read(path)
    change(tensors)
    return io.write(target, tensors, {**manifest, "payload_sha256": io.payload_sha256(tensors)})


def test_codes_past_k_are_refused_before_they_index(tmp_path):
    torch.manual_seed(0)
    layer = vqc.compress(torch.nn.Linear(64, 64), "kmeans", k=3, dim=2, progress=False)
    path = vqc.save(layer, tmp_path / "k3.vqc")
    edited = _payload_edited(path, tmp_path / "edited.vqc", lambda t: t["weight_code.codes"].fill_(255))
    with pytest.raises(VQCError, match="a code points past its 3 codewords"):
        vqc.load(edited, like=torch.nn.Linear(64, 64))


def test_a_permutation_that_is_none_is_refused(tmp_path):
    torch.manual_seed(0)
    model = vqc.compress(torch.nn.Sequential(torch.nn.Embedding(512, 8)), "jlcm", bits=1, steps=0, progress=False)
    assert model[0].weight_code.layout.permuted
    path = vqc.save(model, tmp_path / "perm.vqc")
    edited = _payload_edited(path, tmp_path / "edited.vqc", lambda t: t["0.weight_code.perm"].zero_())
    with pytest.raises(VQCError, match="its row permutation is not one"):
        vqc.load(edited, like=torch.nn.Sequential(torch.nn.Embedding(512, 8)))


def test_kept_rows_out_of_order_are_refused(tmp_path):
    torch.manual_seed(0)
    model = vqc.compress(TinyNet(), "kmeans", bits=2, plan=vqc.Plan(by_name={"embed": {"keep_rows": 40}}), progress=False)
    path = vqc.save(model, tmp_path / "kept.vqc")
    edited = _payload_edited(path, tmp_path / "edited.vqc", lambda t: t["embed.weight_code.kept_index"].fill_(300))
    with pytest.raises(VQCError, match="its kept row numbers are not ascending row numbers"):
        vqc.load(edited, like=TinyNet())
