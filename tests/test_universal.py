"""The universal codebook file: extraction, identity, checks, search by hash."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from vqcompress import universal
from vqcompress.errors import VQCError


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"a": nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 64)), "b": nn.Sequential(nn.Linear(128, 64))}


@pytest.fixture
def book_file(tmp_path):
    return tmp_path / "u.vqcb", universal.save_codebook(universal.build(_models(), 4, 16, per_layer=256), tmp_path / "u.vqcb")


def test_build_is_deterministic_and_the_file_hash_is_the_identity(tmp_path, book_file):
    path, book = book_file
    again = universal.save_codebook(universal.build(_models(), 4, 16, per_layer=256), tmp_path / "again.vqcb")
    assert path.read_bytes() == (tmp_path / "again.vqcb").read_bytes()
    assert book.sha256 == again.sha256 == universal.file_sha256(path)
    loaded = universal.load_codebook(path)
    assert torch.equal(loaded.codewords, book.codewords) and loaded.codewords.shape == (16, 4)
    assert [s["model"] for s in loaded.info["sources"]] == ["a", "b"] and loaded.info["sources"][0]["layers"] == 2


def test_every_layer_gives_the_same_number_of_samples():
    weights = [torch.randn(8, 8), torch.randn(512, 512)]
    samples = universal.sample_subvectors(weights, 4, 100, torch.Generator().manual_seed(0))
    assert samples.shape == (200, 4)
    assert samples[:100].abs().max() < samples.abs().max() * 10  # the small layer is there, normalised


def test_codewords_follow_the_normalised_weight_density():
    """Drawn codewords spread like the data (σ ≈ 1); Lloyd centroids like the optimal quantizer's
    point density p^(d/(d+2)), for a 2-D Gaussian a Gaussian of σ ≈ √2."""
    samples = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0))
    words = universal.extract(samples, 64, seed=0).float()
    assert words.mean(0).abs().max() < 0.25 and 1.2 < words.std() < 1.6
    drawn = universal.extract(samples, 64, placement="sample", seed=0).float()
    assert drawn.shape == (64, 2) and 0.8 < drawn.std() < 1.25


def test_layers_d_does_not_divide_are_skipped_and_named():
    model = nn.Sequential(nn.Linear(66, 100), nn.Linear(64, 100))
    used, skipped = universal.source_layers(model, 4)
    assert [n for n, _ in used] == ["1"] and skipped == ["0"]


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:100]), "not a readable codebook"),
    (lambda p: p.write_bytes(b"junk"), "not a readable codebook"),
    (lambda p: save_file({"codewords": torch.zeros(16, 4).half()}, str(p)), "not a vqcompress codebook"),
    (lambda p: save_file({"codewords": torch.zeros(16, 4).half()}, str(p), metadata={
        universal.KEY: json.dumps({"format": "vqcb", "format_version": 99, "k": 16, "dim": 4})}), "version 99"),
    (lambda p: save_file({"codewords": torch.zeros(8, 4).half()}, str(p), metadata={
        universal.KEY: json.dumps({"format": "vqcb", "format_version": 1, "k": 16, "dim": 4})}), "corrupt"),
])
def test_bad_codebook_files_are_refused(book_file, damage, message):
    path, _ = book_file
    damage(path)
    with pytest.raises(VQCError, match=message):
        universal.load_codebook(path)


def test_missing_file_and_bad_sizes():
    with pytest.raises(VQCError, match="no such codebook"):
        universal.load_codebook("/nonexistent/u.vqcb")
    with pytest.raises(VQCError, match="cannot place"):
        universal.build(_models(), 4, 4096, per_layer=1)


def test_found_by_hash_in_a_folder_and_a_missing_hash_is_named(tmp_path, book_file):
    path, book = book_file
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    path.rename(folder / "renamed.vqcb")
    assert universal.find(book.sha256, [tmp_path, folder]).sha256 == book.sha256
    with pytest.raises(VQCError, match="0" * 64):
        universal.find("0" * 64, [folder])


def test_plot_writes_a_png(tmp_path, book_file):
    _, book = book_file
    out = universal.plot(book, tmp_path / "u.png", torch.randn(500, 4))
    assert out.read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def version_2_file(tmp_path_factory):
    """The packaged codebook (version 1, its bytes fixed: models name it by its hash) written again
    as version 2, whose description carries the sha256 of itself and the codewords."""
    book = universal.load_codebook(universal.DEFAULT)
    path = tmp_path_factory.mktemp("v2") / "u.vqcb"
    universal.save_codebook(universal.UniversalCodebook(book.codewords, {**book.info, "format_version": 2}), path)
    return path, book.codewords


@settings(max_examples=150, deadline=5000, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["bytes", "description"]), rng=st.randoms(use_true_random=False))
def test_a_mutated_codebook_file_loads_as_the_original_or_fails_in_words(tmp_path_factory, version_2_file, kind, rng):
    """A codebook file comes from strangers too: any edit of its bytes or of a field of its
    description gives the original's codewords or one VQCError, and ``vqc codebook inspect`` says
    no more than that."""
    from benchmarks import fuzz
    from vqcompress import cli

    original, codewords = version_2_file
    path = tmp_path_factory.mktemp("book") / "u.vqcb"
    if kind == "bytes":
        path.write_bytes(fuzz.mutate_bytes(original.read_bytes(), rng))
    else:
        book = universal.load_codebook(original)
        description = fuzz.edit_manifest(json.loads(json.dumps(book.info)), rng)
        save_file({"codewords": book.codewords}, str(path), metadata={universal.KEY: json.dumps(description)})
    try:
        assert torch.equal(universal.load_codebook(path).codewords, codewords)
        with contextlib.redirect_stdout(io.StringIO()):
            cli.codebook_inspect(path, png=None, over=None, json_out=False)
    except VQCError:
        pass


def test_a_version_1_codebook_still_loads_and_rule_made_files_keep_their_bytes():
    """Models name a codebook by its file's hash: the packaged file and the rule-made ones stay version 1."""
    assert universal.load_codebook(universal.DEFAULT).info["format_version"] == 1
    assert universal.load_codebook(universal.lattice_file("e8p")).info["format_version"] == universal.RULE_VERSION == 1
