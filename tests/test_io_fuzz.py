"""Property-based fuzzing of the .vqc reader: small valid files of every form (plain codes,
scales, a permutation, the factor form, a universal codebook, kept rows, tied weights), mutated
by hypothesis; ``load``, ``report`` and ``vqc inspect`` either give the original's outputs or
raise a VQCError, within 5 s and 1 GiB. The same forms and mutations run 10,000 times each in
``make fuzz`` (benchmarks/fuzz.py)."""

from __future__ import annotations

import random
import resource

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks import fuzz


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    return folder, {form: fuzz.original(form, folder) for form in fuzz.FORMS}


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@settings(max_examples=300, deadline=fuzz.SECONDS * 1000, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(form=st.sampled_from(sorted(fuzz.FORMS)), kind=st.sampled_from(fuzz.KINDS), rng=st.randoms(use_true_random=False))
def test_a_mutated_file_loads_as_the_original_or_fails_in_words(originals, form, kind, rng: random.Random):
    folder, files = originals
    data, expected = files[form]
    before = _peak_bytes()
    result = fuzz.outcome(form, fuzz.mutated(kind, data, rng, folder), expected, folder)
    assert result in (("same", "refused") if kind == "bytes" else ("same", "refused", "changed"))
    assert _peak_bytes() - before < fuzz.MEMORY


def test_every_form_is_what_it_claims(originals):
    """Each file holds the part it stands for, and loads as the model it was written from."""
    folder, files = originals
    from vqcompress import io

    layouts = {form: [entry["layout"] for entry in io.read_manifest(folder / f"{form}.vqc")[0]["layers"].values()]
               for form in files}
    assert not any("scale_group" in lay for lay in layouts["plain"]) and len(layouts["plain"]) == 2
    assert all("scale_group" in lay for lay in layouts["scales"])
    assert any(lay.get("permuted") for lay in layouts["permutation"])
    assert any(lay.get("terms", 1) > 1 for lay in layouts["factor"])
    assert any(lay.get("codebook_sha256") for lay in layouts["universal"])
    assert any(lay.get("kept_rows") for lay in layouts["kept"])
    assert io.read_manifest(folder / "tied.vqc")[0]["aliases"]
    for form, (data, expected) in files.items():
        assert fuzz.outcome(form, data, expected, folder) == "same"
