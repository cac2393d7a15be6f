"""A model's identity, recorded in every .vqc file: what it was made from, and how to rebuild an
empty model of that kind when a file is loaded without ``like=``.

``Source`` says where a model came from (a kind, a name, its architecture, its transformers
config, the sha256 of its weights). Whoever loads a model may ``remember`` its source (the
library's own loaders do); any other module is described by its class and, if it has one, its
config. Rebuilding goes by the source's kind: a transformers config rebuilds through
transformers, and other kinds (the bundled networks, the zoo) register their builders in
``SKELETONS`` — the core never names a model.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass

from torch import nn

from .errors import VQCError


@dataclass
class Source:
    kind: str  # "bundled", "zoo", "folder" or "module"
    name: str
    architecture: str
    path: str | None = None
    config: dict | None = None
    sha256: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


_known: weakref.WeakKeyDictionary[nn.Module, Source] = weakref.WeakKeyDictionary()

#: source kind → a builder of an empty model from a source (a dict); set by the loaders of that kind
SKELETONS: dict[str, Callable[[dict], nn.Module | None]] = {}


def remember(model: nn.Module, source: Source) -> nn.Module:
    """Record where ``model`` came from (a weak reference: the model carries nothing)."""
    _known[model] = source
    return model


def source_of(model: nn.Module) -> Source:
    """What a model came from: as remembered, else its class and its config (a transformers model's)."""
    if model in _known:
        return _known[model]
    config = getattr(model, "config", None)
    path = getattr(config, "_name_or_path", None) or None
    return Source("module", type(model).__name__, type(model).__name__, path,
                  config.to_dict() if hasattr(config, "to_dict") else None)


def skeleton(source: dict, parameters: int | None = None, tensors: int | None = None) -> nn.Module:
    """An empty model of the source's kind (its weights to come from a file), remembered as of that
    source: a kind's registered builder, else the architecture built from a transformers config —
    refused before it is built where the file could not fill it: more layers than the file's
    ``tensors``, or more than twice its ``parameters``."""
    builder = SKELETONS.get(source["kind"])
    model = builder(source) if builder is not None else None
    if model is None and "model_type" in (source.get("config") or {}):
        architecture = transformers_class(source["architecture"])
        model = build(architecture, checked_config(source["config"], architecture, parameters, tensors,
                                                   "the file's source config"))
    if model is None:
        raise VQCError(f"this file was made from a plain module ({source['name']}): load it with like=<a {source['name']}>")
    return remember(model.eval(), Source(**source))


def transformers_class(architecture: str) -> type:
    """The transformers model class of that name (a model's own), else ``AutoModel``."""
    import transformers

    found = getattr(transformers, architecture, None)
    return found if isinstance(found, type) and issubclass(found, transformers.PreTrainedModel) else transformers.AutoModel


def build(architecture: type, config) -> nn.Module:
    """A model of that transformers class from its config, weights at random."""
    import transformers

    return transformers.AutoModel.from_config(config) if architecture is transformers.AutoModel else architecture(config)


def checked_config(config: dict, architecture: type, parameters: int | None, tensors: int | None, what: str):
    """A transformers config from a stranger's ``config`` dict, refused in one line where
    transformers cannot make it, or where the model of ``architecture`` it makes (on the meta device:
    nothing allocated) has more layers than ``tensors`` or more than about twice ``parameters``:
    more than the weights it is to hold."""
    import torch
    import transformers

    try:
        made = transformers.AutoConfig.for_model(**config)
        layers = getattr(made, "num_hidden_layers", 0)
        if tensors is not None and (type(layers) is not int or layers > tensors):
            raise VQCError(f"it claims {layers!r} layers, for {tensors} tensors")
        if parameters is not None:
            with torch.device("meta"):
                probe = build(architecture, made)
            size = sum(t.numel() for t in [*probe.parameters(), *probe.buffers()])
            if size > 2 * parameters + (1 << 20):
                raise VQCError(f"it makes a model of {size:,} parameters, for {parameters:,} stored")
    except Exception as error:  # transformers raises anything at a bad config
        raise VQCError(f"{what} does not build its model: {str(error).splitlines()[0][:200]}") from None
    return made
