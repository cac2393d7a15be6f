"""The method registry: a method turns one dense weight into a ``CodedWeight``.

Adding a method is adding one file here that defines a ``Method`` and calls ``register``;
layers, the file format and the report never need to know which method made a weight.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from ..calibrate import InputStatistics
from ..coded import CodedWeight, CodeLayout
from ..errors import VQCError


class Method(Protocol):
    """Also read where a method defines them: ``assignments`` (how fine-tuning learns its
    assignments by default, else "ste"), ``corrects_bias`` (False: the layer's bias does not
    absorb the mean output error after fitting, see ``compress.correct_bias``), ``feedback``
    (False: with calibration the codes stay the method's own, not re-chosen with error feedback,
    see ``compress._finished``) and ``quick_settings(settings)`` (cheap settings of the same form, with which the budget
    allocation measures each level; else it measures a k-means of the layout's d and k)."""

    name: str
    learns_assignments: bool  # fine-tuning may move sub-vectors to other codewords
    needs_training: bool  # only meaningful with training data and fine-tuning steps

    def settings(self, shape: tuple[int, ...], bits: float | None, options: dict) -> dict:
        """Concrete settings for a weight of ``shape`` from a bit budget and explicit options.

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


def reject_unknown(options: dict, known: set[str], method: str) -> None:
    """Fail on an option the method does not take, instead of silently ignoring a typo."""
    unknown = set(options) - known
    if unknown:
        raise VQCError(f"{method} does not take option(s) {', '.join(sorted(unknown))}; it takes {', '.join(sorted(known))}")


from . import jlcm, kmeans, qswd, rtn, vq4all, vqdnn  # noqa: E402,F401  (registers the built-in methods)
