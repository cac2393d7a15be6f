"""Which layers are compressed, and with which spec.

A spec is a dict of method options (``method``, ``bits``, ``dim``, ``k`` …) or a method's config
object (``KMeansConfig(dim=4)``); a level that names another method starts that method's options
afresh (only ``LAYER_KEYS`` carry over). It is resolved
like coremltools' configs: the global spec, then the module type's, then every name regex that
fully matches (in order), each merged over the last; ``None`` at any level skips the layer.
By default norms and biases are never coded, and tensors under ``min_weights`` stay dense.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .errors import VQCError
from .layers import CODED_TYPES, codable
from .methods import MethodConfig

SKIP = None
#: What a spec may hold besides a method's options: which method, the layer's own budget, kept rows.
LAYER_KEYS = ("method", "bits", "keep_rows")


def _as_spec(level: dict | MethodConfig) -> dict:
    """A plan entry as a spec: a method's config stands for its method and the options it sets."""
    return {"method": level.method, **level.given()} if isinstance(level, MethodConfig) else level


@dataclass
class Plan:
    by_type: dict[str, dict | MethodConfig | None] = field(default_factory=dict)
    by_name: dict[str, dict | MethodConfig | None] = field(default_factory=dict)
    min_weights: int = 4096

    def resolve(self, model: nn.Module, spec: dict) -> list[tuple[str, nn.Module, dict]]:
        """(name, layer, spec) for every layer to code, in model order."""
        self._check_names(model)
        chosen = []
        for name, module in model.named_modules():
            if not codable(module):
                continue
            layer_spec = self._spec_for(name, module, dict(spec))
            if layer_spec is not SKIP:
                chosen.append((name, module, layer_spec))
        return chosen

    def _spec_for(self, name: str, module: nn.Module, spec: dict) -> dict | None:
        named = [s for pattern, s in self.by_name.items() if re.fullmatch(pattern, name)]
        if not named and module.weight.numel() < self.min_weights:
            return SKIP
        for level in [self.by_type.get(type(module).__name__, {}), *named]:
            if level is SKIP:
                return SKIP
            level = _as_spec(level)
            if level.get("method", spec.get("method")) != spec.get("method"):  # another method: the options before were not its
                spec = {key: value for key, value in spec.items() if key in LAYER_KEYS}
            spec.update(level)
        return spec

    def _check_names(self, model: nn.Module) -> None:
        """A name pattern that asks to code only unsupported layers is a mistake worth stopping for."""
        leaves = [(n, m) for n, m in model.named_modules() if n and not any(m.children())]
        supported = ", ".join(t.__name__ for t in CODED_TYPES)
        for pattern, spec in self.by_name.items():
            matched = [(n, m) for n, m in leaves if re.fullmatch(pattern, n)]
            if not matched:
                example = next((n for n, m in leaves if codable(m)), "")
                raise VQCError(f"layer pattern {pattern!r} names no layer: a pattern must match a whole name "
                               f"(e.g. {example!r}; '.*embed.*' for any name with 'embed' in it)")
            if spec is not SKIP and matched and not any(codable(m) for _, m in matched):
                name, module = matched[0]
                raise VQCError(f"layer {name} is a {type(module).__name__}, which cannot be coded (supported: {supported})")
