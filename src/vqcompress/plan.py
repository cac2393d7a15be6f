"""Which layers are compressed, and with which spec; and what is left dense, and why.

A spec is a dict of method options (``method``, ``bits``, ``dim``, ``k`` …) or a method's config
object (``KMeansConfig(dim=4)``); a level that names another method starts that method's options
afresh (only ``LAYER_KEYS`` carry over). It is resolved
like coremltools' configs: the global spec, then the module type's, then every name regex that
fully matches (in order), each merged over the last; ``None`` at any level skips the layer.
By default norms and biases are never coded, and tensors under ``min_weights`` stay dense.

The candidates are the codable layers (``layers.codable``) and every other floating tensor of
≥ 2 dimensions a module holds itself (``held.py``: an attention's in-projection, an RNN's
weights, a converted graph's constants), named after the module that will hold it
(``owner.x_coded``). Whatever is not coded is listed (``LeftDense``) with its reason: too small,
skipped by the plan, unsupported, or — found when ``Selection.settle`` checks each layer's
settings — not codable by its method at its budget.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from torch import Tensor, nn

from .coded import CodedWeight
from .errors import Unfit, VQCError
from .held import HELD_SUFFIX, HeldTensor, hold
from .layers import CODED_TYPES, CodedLayer, codable
from .methods import MethodConfig

SKIP = None
T = TypeVar("T")
#: What a spec may hold besides a method's options: which method, the layer's own budget, kept rows.
LAYER_KEYS = ("method", "bits", "keep_rows")


def _as_spec(level: dict | MethodConfig) -> dict:
    """A plan entry as a spec: a method's config stands for its method and the options it sets."""
    return {"method": level.method, **level.given()} if isinstance(level, MethodConfig) else level


@dataclass(frozen=True)
class LeftDense:
    """A weight the compression leaves dense: its name (a layer, or a tensor ``owner.x``), size,
    share of the model's weights and why."""

    name: str
    weights: int
    share: float
    reason: str


@dataclass(frozen=True)
class _Candidate:
    name: str  # the layer's, or the holder's a tensor would get
    module: nn.Module  # the layer, or a ``HeldTensor`` of the tensor (not yet in the model)
    owner: nn.Module | None = None  # a tensor's: its module and attribute
    attribute: str = ""

    @property
    def tensor_name(self) -> str:
        """The name a report gives the tensor left dense."""
        if self.owner is None:
            return self.name
        return self.name.removesuffix(HELD_SUFFIX)


@dataclass
class Selection:
    """What a plan chose in a model: ``chosen`` (name, layer, spec), in model order; what it
    left dense; and which layers a name pattern pinned (``settle``)."""

    chosen: list[tuple[str, nn.Module, dict]]
    left_dense: list[LeftDense]
    weights: int  # every floating weight of the model: what shares are of
    pinned: set[str] = field(default_factory=set)
    tensors: dict[str, _Candidate] = field(default_factory=dict)  # chosen tensors, by holder name

    def settle(self, make: Callable[[str, nn.Module, dict], T]) -> list[T]:
        """``make(name, layer, spec)`` for every chosen layer (``compress`` resolves and checks its
        settings there). A layer its method cannot code at its budget (``make`` raises ``Unfit``)
        is left dense with that reason, unless a name pattern pinned it: its user asked for that
        layer, and the error stands, as does any other. The tensors of the layers that stand then
        move into their holders (``held.hold``); the selection keeps only what it left dense."""
        made, refused = [], []
        for name, module, spec in self.chosen:
            try:
                made.append((name, make(name, module, spec)))
            except Unfit as error:
                if name in self.pinned:
                    raise
                refused.append(self._leave(name, f"{spec.get('method')} cannot take it: "
                                                 f"{str(error).removeprefix(name + ': ')}"))
        if refused and not made:
            raise VQCError("no layer can be compressed: " + "; ".join(f"{r.name}: {r.reason}" for r in refused[:3]))
        self.left_dense += refused
        for name, _ in made:
            if name in self.tensors:
                candidate = self.tensors[name]
                hold(candidate.owner, candidate.attribute, candidate.module)
        self.chosen, self.tensors = [], {}  # settled, it holds no layer: each dense weight goes once coded
        return [job for _, job in made]

    def _leave(self, name: str, reason: str) -> LeftDense:
        module = next(module for chosen, module, _ in self.chosen if chosen == name)
        shown = self.tensors[name].tensor_name if name in self.tensors else name
        return LeftDense(shown, module.weight.numel(), module.weight.numel() / max(1, self.weights), reason)


@dataclass
class Plan:
    by_type: dict[str, dict | MethodConfig | None] = field(default_factory=dict)
    by_name: dict[str, dict | MethodConfig | None] = field(default_factory=dict)
    min_weights: int = 4096

    def resolve(self, model: nn.Module, spec: dict) -> list[tuple[str, nn.Module, dict]]:
        """(name, layer, spec) for every layer to code, in model order."""
        return self.select(model, spec).chosen

    def select(self, model: nn.Module, spec: dict) -> Selection:
        """The layers to code with their specs, and what is left dense (the model is not changed:
        a chosen tensor moves into its holder in ``Selection.settle``)."""
        candidates, left = _candidates(model)
        self._check_names(model, candidates)
        weights = _floating_weights(model)
        selection = Selection([], [], weights)
        for candidate in candidates:
            name, module = candidate.name, candidate.module
            named = [s for pattern, s in self.by_name.items() if re.fullmatch(pattern, name)]
            size = module.weight.numel()
            layer_spec = self._spec_for(module, named, dict(spec))
            if not named and size < self.min_weights:
                reason = f"too small (under {self.min_weights:,} weights)"
            elif layer_spec is SKIP:
                reason = "skipped by the plan"
            else:
                selection.chosen.append((name, module, layer_spec))
                selection.pinned.update([name] if named else [])
                if candidate.owner is not None:
                    selection.tensors[name] = candidate
                continue
            selection.left_dense.append(LeftDense(candidate.tensor_name, size, size / max(1, weights), reason))
        selection.left_dense += [LeftDense(name, size, size / max(1, weights), reason) for name, size, reason in left]
        return selection

    def _spec_for(self, module: nn.Module, named: list[dict | None], spec: dict) -> dict | None:
        for level in [self.by_type.get(type(module).__name__, {}), *named]:
            if level is SKIP:
                return SKIP
            level = _as_spec(level)
            if level.get("method", spec.get("method")) != spec.get("method"):  # another method: the options before were not its
                spec = {key: value for key, value in spec.items() if key in LAYER_KEYS}
            spec.update(level)
        return spec

    def _check_names(self, model: nn.Module, candidates: list[_Candidate]) -> None:
        """A name pattern that asks to code only unsupported layers is a mistake worth stopping for."""
        leaves = [(n, m) for n, m in model.named_modules() if n and not any(m.children())]
        leaves += [(c.name, c.module) for c in candidates if c.owner is not None]
        supported = ", ".join(t.__name__ for t in CODED_TYPES if t is not HeldTensor)
        for pattern, spec in self.by_name.items():
            matched = [(n, m) for n, m in leaves if re.fullmatch(pattern, n)]
            if not matched:
                example = next((n for n, m in leaves if codable(m)), "")
                raise VQCError(f"layer pattern {pattern!r} names no layer: a pattern must match a whole name "
                               f"(e.g. {example!r}; '.*embed.*' for any name with 'embed' in it)")
            if spec is not SKIP and matched and not any(codable(m) for _, m in matched):
                name, module = matched[0]
                raise VQCError(f"layer {name} is a {type(module).__name__}, which cannot be coded (supported: {supported}, "
                               "and any other floating tensor of ≥ 2 dimensions)")


def _candidates(model: nn.Module) -> tuple[list[_Candidate], list[tuple[str, int, str]]]:
    """The codable layers and the tensors of ≥ 2 dimensions held elsewhere, in model order; and
    (name, weights, reason) of those that cannot be coded at all."""
    candidates, left = [], []
    for name, module in _modules(model):
        if codable(module):
            if isinstance(module, nn.Embedding) and module.max_norm is not None:
                left.append((name, module.weight.numel(), "unsupported: an Embedding with max_norm rewrites its weight"))
            else:
                candidates.append(_Candidate(name, module))
            continue
        for attribute, tensor, buffer in _own_tensors(module):
            tensor_name = ".".join(filter(None, [name, attribute]))
            if not tensor.isfinite().all():
                left.append((tensor_name, tensor.numel(), "holds Inf or NaN values (a mask?)"))
            else:
                candidates.append(_Candidate(tensor_name + HELD_SUFFIX, HeldTensor.of(tensor, buffer), module, attribute))
    return candidates, left


def _modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every module whose own tensors may be weights: not coded layers or coded weights, nor inside them."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, (CodedLayer, CodedWeight)):
            inside.append(name)
            continue
        yield name, module


def _own_tensors(module: nn.Module) -> Iterator[tuple[str, Tensor, bool]]:
    """(name, tensor, is a buffer) of the module's own floating parameters and persistent buffers of ≥ 2 dimensions."""
    for attribute, tensor in module._parameters.items():
        if tensor is not None and tensor.is_floating_point() and tensor.dim() >= 2:
            yield attribute, tensor, False
    for attribute, tensor in module._buffers.items():
        if (tensor is not None and tensor.is_floating_point() and tensor.dim() >= 2
                and attribute not in module._non_persistent_buffers_set):
            yield attribute, tensor, True


def _floating_weights(model: nn.Module) -> int:
    """Every floating number the model stores (parameters and persistent buffers), each tensor once."""
    seen = {id(t): t for t in model.state_dict(keep_vars=True).values() if t.is_floating_point()}
    return sum(t.numel() for t in seen.values())


def left_dense_lines(left: list[LeftDense]) -> list[str]:
    """What ``compress`` left dense, for people: a line per reason and name, alike names (layer
    numbers folded into #) in one, with their share of the model's weights; nothing when nothing was."""
    if not left:
        return []
    groups: dict[tuple[str, str], list[LeftDense]] = {}
    for entry in left:
        groups.setdefault((re.sub(r"\.\d+(?=\.|$)", ".#", entry.name), entry.reason), []).append(entry)
    total = 100 * math.fsum(entry.share for entry in left)
    return [f"left dense: {len(left)} tensor(s), {total:.2f}% of the weights (biases and norms aside):"] + [
        f"  {f'{name} ×{len(entries)}' if len(entries) > 1 else entries[0].name} "
        f"({100 * math.fsum(e.share for e in entries):.2f}%): {reason}" for (name, reason), entries in groups.items()]
