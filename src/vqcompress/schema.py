"""The one schema a file's JSON is checked against before anything is built from it: a .vqc
manifest, a .vqcb codebook's description, a model folder's config.json.

A file comes from strangers: every field's type and range is checked here, and a manifest's
claims against the tensors the file holds (every coded layer's buffers have the dtypes and shapes
its layout needs, aliases point at stored tensors, a layer's weights are bounded by its stored
bits), so that nothing is allocated from a number the payload does not back. Any violation is one
``VQCError`` naming the field. A schema is a plain value: a ``Check`` (a function of a value and
its path that raises), built from the small constructors below.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import fields

import torch

from .coded import CodeLayout
from .errors import VQCError
from .layers import BIASLESS, LAYER_ARGS

Check = Callable[[object, str], None]
Shapes = dict[str, tuple[str, tuple[int, ...]]]
SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_DEPTH = 32  # nesting of free-form JSON (a source config): deeper is no config anyone wrote
MAX_SEED = 1 << 62  # a rotation seed: 2 · seed + 1 must fit torch's 64-bit generator
WEIGHTS_PER_BIT = 256  # a coded layer's weights per stored bit, at most (d = 16, k = 2 is 16): decoding stays bounded


class Invalid(VQCError):
    """A field of a file's JSON that breaks the schema; its message names the field."""


def fail(path: str, what: str, value: object) -> None:
    shown = repr(value)
    raise Invalid(f"{path} must be {what}, got {shown[:60] + '…' if len(shown) > 60 else shown}")


def integer(low: int = 0, high: int | None = None) -> Check:
    """An int (never a bool) in low … high."""
    def check(value: object, path: str) -> None:
        if type(value) is not int or value < low or (high is not None and value > high):
            fail(path, f"an integer ≥ {low}" + (f" and ≤ {high}" if high is not None else ""), value)
    return check


def kind(*types: type) -> Check:
    """A value of exactly one of these types (``bool`` is not an ``int`` here)."""
    def check(value: object, path: str) -> None:
        if type(value) not in types:
            fail(path, " or ".join(t.__name__ for t in types), value)
    return check


def one_of(*values: object) -> Check:
    def check(value: object, path: str) -> None:
        if type(value) not in {type(v) for v in values} or value not in values:
            fail(path, "one of " + ", ".join(map(repr, values)), value)
    return check


def sha256(value: object, path: str) -> None:
    if not (isinstance(value, str) and SHA256.fullmatch(value)):
        fail(path, "a sha256 (64 hex digits)", value)


def optional(check: Check) -> Check:
    """``check``, or null."""
    return lambda value, path: None if value is None else check(value, path)


def listing(check: Check, low: int = 0) -> Check:
    """A JSON array of at least ``low`` items, each passing ``check``."""
    def run(value: object, path: str) -> None:
        if type(value) is not list or len(value) < low:
            fail(path, f"a list of at least {low} items", value)
        for index, item in enumerate(value):
            check(item, f"{path}/{index}")
    return run


def row(*checks: Check) -> Check:
    """A JSON array of exactly one item per check, in order."""
    def run(value: object, path: str) -> None:
        if type(value) is not list or len(value) != len(checks):
            fail(path, f"a list of {len(checks)} items", value)
        for index, (item, check) in enumerate(zip(value, checks)):
            check(item, f"{path}/{index}")
    return run


def mapping(check: Check, known: dict[str, Check] | None = None) -> Check:
    """A JSON object of any keys, each value passing ``check`` (or its own check in ``known``)."""
    known = known or {}

    def run(value: object, path: str) -> None:
        kind(dict)(value, path)
        for key, item in value.items():
            known.get(key, check)(item, f"{path}/{key}")
    return run


def record(required: dict[str, Check], optional_fields: dict[str, Check] | None = None) -> Check:
    """A JSON object with every ``required`` field, perhaps some ``optional_fields``, no other."""
    optional_fields = optional_fields or {}

    def check(value: object, path: str) -> None:
        kind(dict)(value, path)
        missing = [key for key in required if key not in value]
        if missing:
            raise Invalid(f"{path}/{missing[0]} is missing")
        unknown = [key for key in value if key not in required and key not in optional_fields]
        if unknown:
            raise Invalid(f"{path}/{unknown[0]} is not a field of this format")
        for key, item in value.items():
            (required.get(key) or optional_fields[key])(item, f"{path}/{key}")
    return check


def json_value(value: object, path: str, depth: int = 0) -> None:
    """Any JSON value (what ``json.loads`` gives), nested at most ``MAX_DEPTH`` deep."""
    if depth > MAX_DEPTH:
        fail(path, f"nested at most {MAX_DEPTH} deep", "…")
    if isinstance(value, dict):
        for key, item in value.items():
            json_value(item, f"{path}/{key}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            json_value(item, f"{path}/{index}", depth + 1)
    elif not (value is None or type(value) in (bool, int, float, str)) or value != value or value in (math.inf, -math.inf):
        fail(path, "a finite JSON value", value)


#: what each annotation of ``CodeLayout`` may hold in a manifest
ANNOTATIONS: dict[str, Check] = {"tuple[int, ...]": listing(integer(1), low=2), "int": integer(0, 1 << 62),
                                 "int | None": optional(integer(1, 1 << 62)), "bool": kind(bool), "str": kind(str),
                                 "str | None": optional(sha256)}
LAYOUT = record({"shape": ANNOTATIONS["tuple[int, ...]"], "k": integer(0, 1 << 62), "dim": integer(0, 1 << 62)},
                {item.name: ANNOTATIONS[item.type] for item in fields(CodeLayout)})
ROTATION = record({"kind": one_of("hadamard"), "seed": integer(0, MAX_SEED), "rows": kind(bool)})
LAYER = record({"type": kind(str), "args": mapping(json_value), "bias": kind(bool), "layout": LAYOUT,
                "recipe": mapping(json_value, {"method": kind(str), "candidates": integer(1, 1 << 16)})},
               {"rotation": ROTATION})
SOURCE = record({"kind": kind(str), "name": kind(str), "architecture": kind(str)},
                {"path": optional(kind(str)), "config": optional(mapping(json_value)), "sha256": optional(kind(str))})
MANIFEST = record({"format": one_of("vqc"), "format_version": integer(1), "library_version": kind(str),
                   "source": SOURCE, "layers": mapping(LAYER), "aliases": mapping(kind(str)), "payload_sha256": sha256},
                  {"run": kind(str), "manifest_sha256": sha256})
CODEBOOK = record({"format": one_of("vqcb"), "format_version": integer(1), "dim": integer(1, 1 << 16),
                   "k": integer(2, 1 << 16)},
                  {"sources": listing(record({"model": kind(str), "layers": integer(), "skipped": listing(kind(str))})),
                   "samples_per_layer": integer(1), "bandwidth": kind(str), "placement": kind(str), "seed": integer(),
                   "normalisation": kind(str), "lattice": kind(str), "unit": kind(int, float), "trellis": integer(0, 16),
                   "content_sha256": sha256})


def check(schema: Check, value: object, where: str) -> None:
    """``value`` against ``schema``; a violation is one line starting with ``where``."""
    try:
        schema(value, "")
    except Invalid as error:
        raise VQCError(f"{where}: {str(error).lstrip('/')}") from None


def check_tensors(manifest: dict, shapes: Shapes, where: str, torch_names: dict) -> None:
    """A .vqc manifest (already checked against ``MANIFEST``) against the file's tensors
    (``shapes``: each stored tensor's safetensors dtype and shape; ``torch_names``: torch dtype →
    that dtype's safetensors name)."""
    aliases = manifest["aliases"]
    for alias, original in aliases.items():
        if original not in shapes or alias in shapes:
            raise VQCError(f"{where}: aliases/{alias} must name a stored tensor and be none itself, got {original!r}")
    for name, entry in manifest["layers"].items():
        _check_layer(name, entry, shapes, aliases, manifest["format_version"] >= 2, f"{where}: layers/{name}", torch_names)


def _check_layer(name: str, entry: dict, shapes: Shapes, aliases: dict[str, str], streams_apart: bool, where: str,
                 torch_names: dict) -> None:
    """One coded layer: a valid layout whose buffers are the file's tensors of that layer, exactly."""
    layout = CodeLayout.from_json(entry["layout"])
    try:
        layout.validate()
    except VQCError as error:
        raise VQCError(f"{where}/layout: {error}") from None
    _check_arguments(entry, layout, where)
    prefix = f"{name}.weight_code.".lstrip(".")
    wanted = {prefix + part: (torch_names[dtype], shape) for part, (dtype, shape) in layout.file_buffers(streams_apart).items()}
    held = {key for key in [*shapes, *aliases] if key.startswith(prefix) and "." not in key[len(prefix):]}
    for key in sorted(held | set(wanted)):
        found = shapes.get(aliases.get(key, key))
        if found is None or key not in wanted or (found[0], tuple(found[1])) != wanted[key]:
            raise VQCError(f"{where}: tensor {key} is {_shown(found)} in the file, but its layout needs "
                           f"{_shown(wanted.get(key))}: they do not match (an edited file?)")
    if math.prod(layout.shape) > WEIGHTS_PER_BIT * layout.nbits():
        raise VQCError(f"{where}/layout: {math.prod(layout.shape):,} weights from {layout.nbits():,} stored bits is "
                       f"more than {WEIGHTS_PER_BIT} a bit: not a file vqcompress wrote")


def _check_arguments(entry: dict, layout: CodeLayout, where: str) -> None:
    """The layer's type and constructor arguments make (on the meta device: nothing allocated) a
    layer whose weight has its layout's shape."""
    types = {dense.__name__: dense for dense in LAYER_ARGS}
    dense = types.get(entry["type"])
    if dense is None:
        fail(f"{where}/type", "one of " + ", ".join(types), entry["type"])
    unknown = [key for key in entry["args"] if key not in LAYER_ARGS[dense]]
    if unknown:
        raise VQCError(f"{where}/args/{unknown[0]} is not an argument of a {dense.__name__}")
    missing = [key for key in LAYER_ARGS[dense] if key not in entry["args"]]
    if missing:
        raise VQCError(f"{where}/args/{missing[0]} is missing")
    args = {key: tuple(value) if isinstance(value, list) else value for key, value in entry["args"].items()}
    try:
        with torch.device("meta"):
            shape = tuple(dense(**args, **({} if dense in BIASLESS else {"bias": entry["bias"]})).weight.shape)
    except Exception as error:  # torch's constructors raise what they like at bad arguments
        raise VQCError(f"{where}/args do not make a {dense.__name__}: {str(error).splitlines()[0][:120]}") from None
    if shape != layout.shape:
        raise VQCError(f"{where}/args make a weight of {list(shape)}, its layout says {list(layout.shape)}")


def _shown(shape: tuple[str, tuple[int, ...]] | None) -> str:
    return "absent" if shape is None else f"{shape[0]} {list(shape[1])}"
