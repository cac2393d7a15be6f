"""The .vqc file: a safetensors container with a JSON manifest; never pickle.

Tensors: every entry of the model's state dict (packed codes as uint8, codebooks, scales,
permutations, and every tensor left dense); those under ``PACK_BELOW`` bytes are stored back to
back in one uint8 tensor, ``PACKED``, so that a small model's header is not mostly the
safetensors table. Metadata key ``vqcompress.zlib`` (``vqcompress`` before version 4, plain
JSON): the manifest, zlib-compressed and base85-encoded —
format and library version, the source model's identity and config, per coded layer its torch
type, constructor arguments, code layout and recipe (method + settings), tensors stored once
for several names (tied weights), and a sha256 of the payload that loading checks; from version 5
on, the manifest's own sha256 beside it. Before anything is built from a manifest, ``schema``
checks every field and its claims against the tensors present (any version). A coded
tensor of another module (``held.py``) is a layer of type ``HeldTensor`` named after its holder;
loading moves the model's tensor into a holder first.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from . import __version__, schema, universal
from .atomic import write_tensors
from .coded import CodedWeight, CodeLayout, code_bits, file_streams, memory_streams, row_slices, unpack_codes
from .errors import VQCError
from .held import HeldTensor, hold_named
from .layers import LAYER_ARGS, carry_embed_scale, coded_from_args, dense_type_of, iter_coded, layer_args
from .rotation import Rotation
from .source import Source, skeleton, source_of

FORMAT = "vqc"
#: 2: a kept row's codes are left out of the file (1 stored them, unused); 3: a layout lists only
#: what differs from its defaults (2 listed every field, and kept rows' dtype only when int8 was possible);
#: coded tensors of any module (``HeldTensor`` layers) and permutations past 65,536 rows (row numbers past 16 bits);
#: 4: small tensors packed into one, the manifest compressed; 5: the manifest's own sha256 (``MANIFEST_HASH``)
FORMAT_VERSION = 5
READABLE_VERSIONS = (1, 2, 3, 4, 5)
MANIFEST_KEY = "vqcompress"  # versions 1 - 3: the manifest as JSON
ZLIB_KEY = "vqcompress.zlib"  # version 4: the manifest (with its ``packed`` list) compressed
MANIFEST_HASH = "manifest_sha256"  # version 5: the sha256 of the rest of the stored manifest (``_manifest_sha256``)
MANIFEST_LIMIT = 64 << 20  # bytes a decompressed manifest may reach: no file can make the reader allocate more
PACKED = "vqc:packed"  # no state-dict name holds a colon
PACK_BELOW = 16384  # bytes: a smaller tensor's table entry (about 90 bytes) would cost it more than 0.5%
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
PACKED_LIST = schema.listing(schema.row(schema.kind(str), schema.one_of(*TORCH_DTYPES), schema.listing(schema.integer())))


def payload_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Hash of names, dtypes, shapes and bytes of every tensor, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def universal_codebooks(model: nn.Module) -> dict[str, str]:
    """State-dict name of every universal codebook the model holds → its sha256 (stored apart)."""
    return {f"{name}.weight_code.codebook".lstrip("."): layer.weight_code.layout.codebook_sha256
            for name, layer in iter_coded(model) if layer.weight_code.layout.codebook_sha256}


def shapes_of(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Each tensor's (safetensors dtype, shape): what a file's size and bit report follow from."""
    return {name: (SAFETENSORS_DTYPES[t.dtype], tuple(t.shape)) for name, t in tensors.items()}


def model_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each shared tensor kept once, and the aliases that point to it; a
    universal codebook is left out (its file is its own)."""
    tensors, aliases, seen = {}, {}, {}
    universal = universal_codebooks(model)
    for name, tensor in model.state_dict().items():
        if name in universal:
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            tensors[name] = tensor.detach().cpu().contiguous()
    for name, layer in iter_coded(model):  # kept rows' codes are never read, a trellis stores new bits
        code, prefix = layer.weight_code, f"{name}.weight_code."
        if code.layout.file_streams_differ and f"{prefix}codes" in tensors:
            buffers = dict(code.named_buffers(recurse=False))
            tensors.update({prefix + k: v for k, v in file_streams(code.layout, buffers).items()})
    return tensors, aliases


def layer_entry(layer: nn.Module, layout: CodeLayout, recipe: dict) -> dict:
    """A coded layer as the manifest records it (``layer`` dense or coded: its type and arguments,
    and its rotation where it has one)."""
    rotation = getattr(layer, "rotation", None)
    return {"type": dense_type_of(layer).__name__, "args": layer_args(layer),
            "bias": getattr(layer, "bias", None) is not None, "layout": layout.to_json(), "recipe": recipe,
            **({"rotation": rotation.to_json()} if rotation is not None else {})}


def manifest_of(model: nn.Module, tensors: dict[str, torch.Tensor], aliases: dict[str, str],
                source: Source | None = None, run: str | None = None) -> dict:
    layers = {name: layer_entry(layer, layer.weight_code.layout, layer.weight_code.recipe)
              for name, layer in iter_coded(model)}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__,
        "source": (source or source_of(model)).to_json(), "layers": layers, "aliases": aliases,
        "payload_sha256": payload_sha256(tensors), **({"run": run} if run else {}),
    }


Shapes = dict[str, tuple[str, tuple[int, ...]]]


def _nbytes(shape: tuple[str, tuple[int, ...]]) -> int:
    return DTYPE_BYTES[shape[0]] * math.prod(shape[1])


def _packing(shapes: Shapes) -> list[str]:
    """The tensors stored inside ``PACKED``, in their order there: widest dtype first, so that each
    one's offset is a multiple of its item size (no padding), then by name."""
    small = [name for name, shape in shapes.items() if _nbytes(shape) < PACK_BELOW]
    return sorted(small, key=lambda name: (-DTYPE_BYTES[shapes[name][0]], name))


def _stored_form(shapes: Shapes, manifest: dict) -> tuple[Shapes, dict[str, str], list[str]]:
    """What the file holds for these tensors and manifest: its tensors' (dtype, shape), its
    metadata, and the names packed into ``PACKED``."""
    packed = _packing(shapes)
    inside = set(packed)
    stored = {name: shape for name, shape in shapes.items() if name not in inside}
    if packed:
        stored[PACKED] = ("U8", (sum(_nbytes(shapes[name]) for name in packed),))
    listed = {**manifest, "packed": [[name, *shapes[name]] for name in packed]}
    text = _canonical({**listed, MANIFEST_HASH: _manifest_sha256(listed)})
    return stored, {ZLIB_KEY: base64.b85encode(zlib.compress(text, 9)).decode()}, packed


def _canonical(manifest: dict) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def _manifest_sha256(listed: dict) -> str:
    """The sha256 of a stored manifest without its own hash: it holds the payload's sha256, so it
    covers the whole file, and a reader checks it before it uses any field."""
    return hashlib.sha256(_canonical({k: v for k, v in listed.items() if k != MANIFEST_HASH})).hexdigest()


def write(path: str | os.PathLike, tensors: dict[str, torch.Tensor], manifest: dict) -> Path:
    """Write ``tensors`` and ``manifest`` as a .vqc file, atomically: a temp file beside it,
    renamed when complete."""
    stored_shapes, metadata, packed = _stored_form(shapes_of(tensors), manifest)
    stored = {name: t for name, t in tensors.items() if name in stored_shapes}
    if packed:
        stored[PACKED] = torch.cat([tensors[name].reshape(-1).view(torch.uint8) for name in packed])
    return write_tensors(path, stored, metadata)


def file_bytes(shapes: Shapes, manifest: dict) -> int:
    """The exact size of the file ``save`` writes for tensors of these (safetensors dtype, shape) and
    this manifest: the 8-byte header length, the header (safetensors' JSON tensor table, entries
    sorted by alignment then name, and the metadata; padded to 8 bytes) and the
    payload. What every whole-model bits-per-weight figure counts, before or after writing."""
    shapes, metadata, _ = _stored_form(shapes, manifest)
    sizes = {name: _nbytes(shape) for name, shape in shapes.items()}
    entries, offset = [], 0
    for name in sorted(shapes, key=lambda n: (-DTYPE_BYTES[shapes[n][0]], n)):
        entry = {"dtype": shapes[name][0], "shape": list(shapes[name][1]), "data_offsets": [offset, offset + sizes[name]]}
        entries.append(json.dumps(name, ensure_ascii=False) + ":" + json.dumps(entry, separators=(",", ":")))
        offset += sizes[name]
    metadata = json.dumps(metadata, ensure_ascii=False, separators=(",", ":"))
    header = len(("{" + ",".join(['"__metadata__":' + metadata, *entries]) + "}").encode())
    return 8 + header + (-header) % 8 + offset


def save(model: nn.Module, path: str | os.PathLike, source: Source | None = None, run: str | None = None) -> Path:
    """Write ``model`` to ``path`` atomically. A checkpoint records the ``run`` it belongs to
    (``compress``), so only that run resumes from it."""
    tensors, aliases = model_tensors(model)
    return write(path, tensors, manifest_of(model, tensors, aliases, source, run))


def read_manifest(path: str | os.PathLike) -> tuple[dict, Shapes]:
    """The manifest and each tensor's (dtype, shape), without loading the tensors."""
    manifest, shapes, packed = _header(Path(path))
    shapes.pop(PACKED, None)
    return manifest, shapes | dict(packed)


def _manifest_text(path: Path, metadata: dict[str, str]) -> str:
    if ZLIB_KEY in metadata:
        try:
            inflater = zlib.decompressobj()
            text = inflater.decompress(base64.b85decode(metadata[ZLIB_KEY]), MANIFEST_LIMIT)
        except (ValueError, zlib.error):
            raise VQCError(f"{path} has a corrupt manifest") from None
        if inflater.unconsumed_tail:
            raise VQCError(f"{path} has a manifest of more than {MANIFEST_LIMIT >> 20} MiB: not a file vqcompress wrote")
        return text.decode("utf-8", "replace")
    if MANIFEST_KEY in metadata:
        return metadata[MANIFEST_KEY]
    raise VQCError(f"{path} is a safetensors file but not a .vqc file (no vqcompress manifest)")


def _header(path: Path) -> tuple[dict, Shapes, list[tuple[str, tuple[str, tuple[int, ...]]]]]:
    """The manifest, the file's own tensors' (dtype, shape), and the packed tensors in order."""
    if not path.is_file():
        raise VQCError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            shapes = {k: (str(handle.get_slice(k).get_dtype()), tuple(handle.get_slice(k).get_shape())) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise VQCError(f"{path} is not a readable .vqc file (truncated or corrupt?): {error}") from None
    try:
        manifest = json.loads(_manifest_text(path, metadata))
    except json.JSONDecodeError:
        raise VQCError(f"{path} has a corrupt manifest") from None
    if not isinstance(manifest, dict):
        raise VQCError(f"{path} has a corrupt manifest")
    _check_version(path, manifest)
    packed = _packed_list(path, manifest.pop("packed", []))
    where = f"{path} has a bad manifest"
    schema.check(schema.MANIFEST, manifest, where)
    if manifest["format_version"] < 3:  # files from before kept rows could be int8 kept them in fp16, unsaid
        for entry in manifest["layers"].values():
            entry["layout"].setdefault("kept_dtype", "float16")
    schema.check_tensors(manifest, {k: v for k, v in shapes.items() if k != PACKED} | dict(packed), where,
                         SAFETENSORS_DTYPES)
    return manifest, shapes, packed


def _check_version(path: Path, manifest: dict) -> None:
    """Ours, a version this library reads, and from version 5 on, its own sha256 matching."""
    version = manifest.get("format_version")
    if manifest.get("format") != FORMAT:
        raise VQCError(f"{path} is not a .vqc file")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise VQCError(f"{path} has format version {version!r}; this vqcompress {__version__} "
                       f"reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    if version >= 5 and manifest.pop(MANIFEST_HASH, None) != _manifest_sha256(manifest):
        raise VQCError(f"{path} is corrupt or was edited: its manifest does not match its sha256")


def _packed_list(path: Path, listed: object) -> list[tuple[str, tuple[str, tuple[int, ...]]]]:
    """The manifest's list of packed tensors, [name, dtype, shape] each, checked."""
    schema.check(PACKED_LIST, listed, f"{path} has a corrupt manifest: its list of packed tensors")
    return [(name, (dtype, tuple(shape))) for name, dtype, shape in listed]


def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors and the manifest, after checking the payload's sha256 and the values used as
    indices (``_check_values``)."""
    manifest, _, packed = _header(Path(path))
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise VQCError(f"{path} is not a readable .vqc file (truncated or corrupt?): {error}") from None
    tensors |= _unpack(Path(path), tensors.pop(PACKED, torch.zeros(0, dtype=torch.uint8)), packed)
    if payload_sha256(tensors) != manifest["payload_sha256"]:
        raise VQCError(f"{path} is corrupt or was tampered with: its payload does not match its sha256")
    _check_values(manifest, tensors)
    return tensors, manifest


def _unpack(path: Path, blob: torch.Tensor, packed: list[tuple[str, tuple[str, tuple[int, ...]]]]) -> dict[str, torch.Tensor]:
    """The tensors stored back to back in ``PACKED``: views of it."""
    if blob.dtype != torch.uint8 or blob.dim() != 1 or len(blob) != sum(_nbytes(shape) for _, shape in packed):
        raise VQCError(f"{path} is corrupt: its packed tensors do not match their list in the manifest")
    tensors, offset = {}, 0
    for name, (dtype, shape) in packed:
        size = _nbytes((dtype, shape))
        try:  # a view is refused where an edited list puts a tensor off its item size
            tensors[name] = blob[offset:offset + size].view(TORCH_DTYPES[dtype]).reshape(shape)
        except RuntimeError:
            raise VQCError(f"{path} is corrupt: packed tensor {name} is misplaced") from None
        offset += size
    return tensors


def _install_coded_layers(model: nn.Module, manifest: dict, stored: set[str]) -> nn.Module:
    """Put an empty coded layer wherever the file has one, checking the model has that layer; the
    model (a new object only when it is itself the one coded layer). A layer whose coded weight is
    stored only as aliases of another's (a tied embedding and output layer) gets that layer's very
    coded weight, as when it was compressed, so training moves both."""
    leaders = _tied_leaders(manifest, stored)
    codes: dict[str, CodedWeight] = {}
    present = {name for name, _ in model.named_modules()}  # a coded tensor's holder is made here when absent
    for name in sorted(manifest["layers"], key=lambda layer: layer in leaders):  # leaders' codes first
        entry = manifest["layers"][name]
        layout = CodeLayout.from_json(entry["layout"])
        if entry["type"] == HeldTensor.__name__ and name not in present:
            hold_named(model, name)
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise VQCError(f"the model has no layer {name!r} that the file codes: is it the same architecture?") from None
        if not isinstance(current, tuple(LAYER_ARGS)) or dense_type_of(current).__name__ != entry["type"]:
            raise VQCError(f"layer {name} is a {type(current).__name__} in the model but a {entry['type']} in the file")
        if tuple(current.weight.shape) != layout.shape:
            raise VQCError(f"shape mismatch at {name}: the model has {tuple(current.weight.shape)}, the file {layout.shape}")
        _check_arguments(name, current, entry)
        code = codes[leaders[name]] if name in leaders else CodedWeight.empty(layout)
        code.recipe = entry["recipe"]
        codes[name] = code
        rotation = entry.get("rotation")
        rotation = None if rotation is None else Rotation.from_json(rotation, layout.rows, layout.cols)
        layer = coded_from_args(entry["type"], entry["args"], code, entry["bias"], rotation)
        carry_embed_scale(current, layer)
        if name:
            model.set_submodule(name, layer)
        else:  # the model is itself one layer
            model = layer
    return model


def _check_arguments(name: str, module: nn.Module, entry: dict) -> None:
    """The model's layer is what the file says it codes: its constructor arguments (a convolution's
    stride, padding …) and bias are the model's own, never overridden by the file."""
    args = layer_args(module)
    if args != entry["args"]:
        differ = next(key for key in sorted(args) if args[key] != entry["args"][key])  # the schema checked the keys
        raise VQCError(f"layer {name}: {differ} is {entry['args'].get(differ)!r} in the file but "
                       f"{args.get(differ)!r} in the model: is it the same architecture?")
    if (getattr(module, "bias", None) is not None) != entry["bias"]:
        raise VQCError(f"layer {name}: the file says it has {'a' if entry['bias'] else 'no'} bias, the model's has "
                       f"{'none' if entry['bias'] else 'one'}: is it the same architecture?")


def _check_values(manifest: dict, tensors: dict[str, torch.Tensor]) -> None:
    """What no shape can say, checked before a tensor is used as an index: kept row numbers
    ascending and in range, a permutation one of the rows, every code below k (each sub-vector of
    a mask with its s positions)."""
    for name, entry in manifest["layers"].items():
        layout, prefix, where = CodeLayout.from_json(entry["layout"]), f"{name}.weight_code.".lstrip("."), f"layer {name}"

        def part(key: str) -> torch.Tensor:
            return tensors[manifest["aliases"].get(prefix + key, prefix + key)]

        if layout.kept_rows:
            kept = part("kept_index").to(torch.int64)
            if int(kept[0]) < 0 or int(kept[-1]) >= layout.rows or (kept[1:] <= kept[:-1]).any():
                raise VQCError(f"{where}: its kept row numbers are not ascending row numbers (an edited file?)")
        if layout.permuted:
            perm = unpack_codes(part("perm"), code_bits(layout.rows), torch.arange(layout.rows))
            if not torch.equal(perm.sort().values, torch.arange(layout.rows)):
                raise VQCError(f"{where}: its row permutation is not one (an edited file?)")
        width, per_row = layout.row_streams()["codes"]
        codes, masked = part("codes"), layout.factored and layout.masked
        if layout.trellis or (not masked and layout.k == 1 << width):
            continue
        rows = codes.numel() * 8 // (width * per_row)
        for piece in row_slices(rows, per_row):
            entries = unpack_codes(codes, width, torch.arange(piece.start * per_row, piece.stop * per_row))
            if masked and not (entries.reshape(-1, layout.k).sum(1) == layout.terms).all():
                raise VQCError(f"{where}: a sub-vector's mask does not hold its {layout.terms} positions (an edited file?)")
            if not masked and int(entries.max()) >= layout.k:
                raise VQCError(f"{where}: a code points past its {layout.k} codewords (an edited file?)")


def _restore_row_streams(manifest: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Give every coded weight whose file streams differ its row streams as memory holds them (the
    file leaves the kept rows' entries out, holds a trellis's new bits only)."""
    for name, entry in manifest["layers"].items():
        layout, prefix = CodeLayout.from_json(entry["layout"]), f"{name}.weight_code."
        if layout.file_streams_differ and f"{prefix}codes" in tensors:
            buffers = {key.removeprefix(prefix): value for key, value in tensors.items() if key.startswith(prefix)}
            tensors.update({prefix + k: v for k, v in memory_streams(layout, buffers).items()})


def _tied_leaders(manifest: dict, stored: set[str]) -> dict[str, str]:
    """Layer → the layer whose coded weight it holds: every tensor of its coded weight is an alias
    of that layer's, none is stored under its own name."""
    leaders = {}
    for name in manifest["layers"]:
        prefix = f"{name}.weight_code."
        targets = {original.removesuffix(alias.removeprefix(prefix)) for alias, original in manifest["aliases"].items()
                   if alias.startswith(prefix)}
        leader = targets.pop().removesuffix(".weight_code.") if len(targets) == 1 else None
        if leader in manifest["layers"] and leader != name and not any(key.startswith(prefix) for key in stored):
            leaders[name] = leader
    return leaders


def _universal_tables(model: nn.Module, folders: list[Path]) -> dict[str, torch.Tensor]:
    """The table of every universal codebook the model's coded layers point at, found by hash in
    ``folders`` and checked against each layer's layout; by state-dict name."""
    found: dict[str, torch.Tensor] = {}
    tables = {}
    for name, sha256 in universal_codebooks(model).items():
        if sha256 not in found:
            found[sha256] = universal.table(universal.find(sha256, folders).sha256)
        layout = model.get_submodule(name.rsplit(".", 1)[0]).layout
        if found[sha256].shape[1:] != (layout.k, layout.dim):
            raise VQCError(f"universal codebook {sha256[:12]}… is {found[sha256].shape[1]} × {found[sha256].shape[2]}, "
                           f"but layer {name} needs k = {layout.k}, d = {layout.dim}")
        tables[name] = found[sha256]
    return tables


def _parameters(manifest: dict, tensors: dict[str, torch.Tensor]) -> int:
    """What a file holds at most, in parameters: every coded layer's weights, every stored element."""
    return (sum(math.prod(entry["layout"]["shape"]) for entry in manifest["layers"].values())
            + sum(t.numel() for t in tensors.values()))


def load(path: str | os.PathLike, like: nn.Module | None = None, device: str = "cpu",
         codebooks: list[str | os.PathLike] = ()) -> nn.Module:
    """Rebuild a compressed model: into ``like`` (modified in place; a single layer is replaced) or
    from the recorded source.
    Universal codebooks are looked up by hash beside the file, in ``codebooks`` (folders) and on
    the search path (``universal.search_path``)."""
    tensors, manifest = read(path)
    model = like if like is not None else skeleton(manifest["source"], _parameters(manifest, tensors), len(tensors))
    model = _install_coded_layers(model, manifest, set(tensors))
    if manifest["format_version"] >= 2:
        _restore_row_streams(manifest, tensors)
    universal_tables = _universal_tables(model, [Path(path).parent, *map(Path, codebooks), *universal.search_path()])
    tensors.update(universal_tables)
    for alias, original in manifest["aliases"].items():
        tensors[alias] = tensors[original]
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[-1].strip()
        raise VQCError(f"the file does not fit the model: {first}") from None
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise VQCError(f"the file does not fit the model ({what}): is it the same architecture?")
    model = model.to(device).eval()
    universal_aliases = {name: next(n for n, t in universal_tables.items() if t is table) for name, table in universal_tables.items()}
    _tie_shared_buffers(model, {**manifest["aliases"], **universal_aliases})  # after the move, which copies buffers apart
    return model


def _tie_shared_buffers(model: nn.Module, aliases: dict[str, str]) -> None:
    """A buffer stored once for several layers (a shared codebook) becomes one tensor again, as it
    was when saved; ``load_state_dict`` alone would leave each layer a copy."""
    for alias, original in aliases.items():
        owner, _, attribute = alias.rpartition(".")
        module = model.get_submodule(owner)
        if attribute in module._buffers:
            module._buffers[attribute] = model.get_buffer(original)
