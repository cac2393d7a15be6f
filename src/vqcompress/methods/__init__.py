"""The method registry: a method turns one dense weight into a ``CodedWeight``.

Adding a method is adding one file here that defines a ``Method`` and calls ``register``;
layers, the file format and the report never need to know which method made a weight.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, fields
from typing import ClassVar, Literal, Protocol

from torch import Tensor

from ..calibrate import InputStatistics
from ..coded import CodedWeight, CodeLayout
from ..errors import VQCError

#: Settings that belong to the pipeline, not to a method: named in the error when a user gives
#: one as a method option (they never share one namespace).
PIPELINE_OPTIONS = {"finetune_steps": "compress(finetune_steps=…) / --finetune-steps",
                    "finetune_lr": "compress(finetune_lr=…) / --finetune-lr",
                    "tune_blocks": "compress(tune_blocks=…) / --tune-blocks", "seed": "compress(seed=…) / --seed"}


@dataclass(frozen=True)
class MethodConfig:
    """A method's options as a user gives them, each checked against its type where the config is
    made. A field left None is the method's own choice, made per layer from the budget and the
    layer's shape; so configs merge like coremltools' (global → module type → name: ``merged``).
    Subclasses are dataclasses whose fields are ``int | None``, ``float | None``, ``str | None``
    or ``Literal[...] | None``; ``minimum`` (a ClassVar) gives numbers their lower bounds."""

    method: ClassVar[str] = ""
    minimum: ClassVar[dict[str, float]] = {}
    transform: Literal["none", "hadamard"] | None = None  # the weight coded in a rotated basis (``rotation.py``)

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for item in fields(self):
            _check_option(self.method, item.name, getattr(self, item.name), hints[item.name],
                          self.minimum.get(item.name))

    def given(self) -> dict:
        """The options the user set (not None)."""
        return {item.name: getattr(self, item.name) for item in fields(self) if getattr(self, item.name) is not None}

    def merged(self, options: dict) -> MethodConfig:
        """This config with ``options`` (given ones only) over it, checked again."""
        return make_config(get_method(self.method), self.given() | options)


def _check_option(method: str, name: str, value: object, hint: object, minimum: float | None) -> None:
    """One line in words when ``value`` is not what option ``name``'s annotation allows."""
    if value is None:
        return
    allowed = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    choices = [c for a in allowed if typing.get_origin(a) is Literal for c in typing.get_args(a)]
    if choices:
        if value not in choices:
            raise VQCError(f"{method} option {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return
    kind = allowed[0]
    numeric = kind in (int, float) and not isinstance(value, bool)
    if kind is int and not (numeric and isinstance(value, int)):
        raise VQCError(f"{method} option {name} must be a whole number, got {value!r}")
    if kind is float and not (numeric and isinstance(value, (int, float)) and math.isfinite(value)):
        raise VQCError(f"{method} option {name} must be a finite number, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise VQCError(f"{method} option {name} must be text, got {value!r}")
    if minimum is not None and value < minimum:
        raise VQCError(f"{method} option {name} must be ≥ {minimum:g}, got {value!r}")


def make_config(method: Method, options: dict) -> MethodConfig:
    """The method's config from plain options (the CLI's ``-O``, ``compress(**options)``, plan
    entries): an option it does not take is refused in words, and one that belongs to the
    pipeline says where it goes."""
    known = {item.name for item in fields(method.config)}
    unknown = sorted(set(options) - known)
    if unknown:
        where = [f"{name} is a pipeline setting: {PIPELINE_OPTIONS[name]}" for name in unknown if name in PIPELINE_OPTIONS]
        raise VQCError(f"{method.name} does not take option(s) {', '.join(unknown)}; it takes "
                       f"{', '.join(sorted(known)) or 'none'}" + "".join(f" ({note})" for note in where))
    return method.config(**options)


class Method(Protocol):
    """Also read where a method defines them: ``assignments`` (how fine-tuning learns its
    assignments by default, else "ste"), ``corrects_bias`` (False: the layer's bias does not
    absorb the mean output error after fitting, see ``compress.correct_bias``), ``feedback``
    (False: with calibration the codes stay the method's own, not re-chosen with error feedback,
    see ``compress._finished``), ``weighs_inputs`` (False: ``fit`` ignores the calibration statistics, so
    passes that only feed them are skipped) and ``quick_settings(settings)`` (cheap settings of the same form,
    with which the budget allocation measures each level; else it measures a k-means of the layout's d and k)."""

    name: str
    config: type[MethodConfig]  # its options, typed
    learns_assignments: bool  # fine-tuning may move sub-vectors to other codewords
    needs_training: bool  # only meaningful with training data and fine-tuning steps

    def settings(self, shape: tuple[int, ...], bits: float | None, config: MethodConfig) -> dict:
        """Concrete settings for a weight of ``shape`` from a per-layer bit budget and its config.

        Raises ``VQCError`` when the budget or options cannot be met, before any fitting.
        """

    def layout(self, shape: tuple[int, ...], settings: dict) -> CodeLayout:
        """The layout ``fit`` will produce, so every layer can be checked before work starts."""

    def fit(self, weight: Tensor, settings: dict, seed: int, inputs: InputStatistics | None = None) -> CodedWeight:
        """Find the coded weight for a dense ``weight`` (rows × cols, float32); with the layer's
        calibration ``inputs``, minimise the error where the inputs put it."""


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise VQCError(f"unknown method {name!r}: choose from {', '.join(sorted(METHODS))}")
    return METHODS[name]


from . import jlcm, kmeans, qswd, rtn, vq4all, vqdnn  # noqa: E402,F401  (registers the built-in methods)
