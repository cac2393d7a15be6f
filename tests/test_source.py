"""A model's identity: remembered for the models the library loads, read from a module otherwise,
rebuilt from a file; and the core's independence from the harness that names models."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

import vqcompress as vqc
from vqcompress.errors import VQCError
from vqcompress.source import Source, remember, skeleton, source_of

PACKAGE = Path(vqc.__file__).parent
#: the harness: what names models, data and suites, and the command line over it all
HARNESS = {"models", "suites", "data", "cli", "__main__"}


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=128, max_position_embeddings=32)).eval()


def test_a_plain_transformers_model_saved_without_a_source_loads_without_like(tmp_path):
    """Its config is its description: the file rebuilds a BertModel of that config."""
    model = vqc.compress(tiny_bert(), "kmeans", bits=4, progress=False)
    vqc.save(model, tmp_path / "bert.vqc")
    loaded = vqc.load(tmp_path / "bert.vqc")
    ids = torch.randint(0, 500, (2, 7), generator=torch.Generator().manual_seed(0))
    assert type(loaded) is BertModel and source_of(loaded).kind == "module"
    assert torch.allclose(loaded(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state, atol=1e-5)


def test_a_plain_module_needs_like():
    model = vqc.compress(nn.Sequential(nn.Linear(64, 64)), "kmeans", bits=4, progress=False)
    source = source_of(model)
    assert (source.kind, source.architecture, source.config) == ("module", "Sequential", None)
    with pytest.raises(VQCError, match="load it with like=<a Sequential>"):
        skeleton(source.to_json())


def test_a_remembered_source_is_the_models_and_the_model_carries_nothing():
    model, source = nn.Linear(4, 4), Source("zoo", "fashion-cnn", "FashionCNN", sha256="0" * 64)
    before = dict(vars(model))
    assert remember(model, source) is model and source_of(model) is source
    assert vars(model) == before and source_of(copy.deepcopy(model)).kind == "module"


def test_a_compressed_model_carries_no_attribute_of_the_library():
    model = vqc.compress(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)), "kmeans", bits=2,
                         progress=False)
    assert not [name for name in vars(model) if name.startswith("vqc")]


def _imports(path: Path) -> set[str]:
    """The package's modules a file imports (top-level names under ``vqcompress``)."""
    relative = path.relative_to(PACKAGE).with_suffix("").parts
    here = list(relative[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[:len(here) - (node.level - 1)] if node.level > 1 else here
            parts = [*base, *(node.module.split(".") if node.module else [])]
            found |= {parts[0]} if parts else {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vqcompress."):
            found.add(node.module.split(".")[1])
    return found


def test_the_core_imports_nothing_that_names_models_data_or_suites():
    """The core (coded weights, layers, kernels, methods, pipeline, file, report) stands alone; the
    harness plugs in through ``source.SKELETONS`` and ``text.CORPORA`` (wired in ``__init__``)."""
    core = [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0].removesuffix(".py") not in HARNESS
            and p != PACKAGE / "__init__.py"]
    assert len(core) > 30
    offenders = {str(p.relative_to(PACKAGE)): sorted(_imports(p) & HARNESS) for p in core if _imports(p) & HARNESS}
    assert offenders == {}


def test_the_architecture_page_maps_every_module_once_in_a_short_line():
    """docs/architecture.md is a true one-page map: one table row per module (a folder's modules
    under the folder), each row short."""
    page = (PACKAGE.parents[1] / "docs" / "architecture.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| ") and "`" in line]
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        name = f"`{relative.parts[0]}/`" if relative.parts[0] in ("kernels", "suites") else f"`{relative.as_posix()}`"
        assert sum(name in row.split("|")[2] for row in rows) == 1, name
    assert max(len(row) for row in rows) <= 240


UNPICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}


def _unpickling_calls(tree: ast.AST) -> list[str]:
    """What in a module can run code from a file: an unpickling module imported, ``eval`` or
    ``exec`` called, ``torch.load`` without ``weights_only=True``, ``numpy.load`` with pickles allowed."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [f"import {name}" for name in names if name and name.split(".")[0] in UNPICKLING_MODULES]
        if not isinstance(node, ast.Call):
            continue
        called = ast.unparse(node.func)
        keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if called in ("eval", "exec") or (called.endswith("read_pickle")):
            found.append(called)
        if called == "torch.load" and keywords.get("weights_only") != "True":
            found.append("torch.load without weights_only=True")
        if called in ("np.load", "numpy.load") and keywords.get("allow_pickle") not in (None, "False"):
            found.append("numpy.load with pickles allowed")
    return found


def test_nothing_in_the_project_ever_unpickles():
    """Files come from strangers: no code path may run what a file holds."""
    root = PACKAGE.parents[1]
    offenders = {str(path.relative_to(root)): calls for folder in ("src", "benchmarks", "tests")
                 for path in sorted((root / folder).rglob("*.py"))
                 if (calls := _unpickling_calls(ast.parse(path.read_text(), str(path))))}
    assert offenders == {}
    assert _unpickling_calls(ast.parse("import pickle\ntorch.load(f)\neval('1')\nnp.load(f, allow_pickle=True)")) == [
        "import pickle", "torch.load without weights_only=True", "eval", "numpy.load with pickles allowed"]
