"""``vq4all``: every layer coded with one universal codebook, shared by every network.

The codebook is a file of its own (``universal.py``: built once by kernel density estimation
over many networks, identified by its sha256); a layer stores only its packed indices and one
fp16 scale per row, so the cost is log2(k)/d + 16/inputs bits per weight whatever the budget
(``--bits`` is only checked against it). Fitting: each row over its RMS (the units the codebook
was extracted in), then the nearest codeword under the input-weighted distance; with a lattice
codebook (``lattice.py``), whose search is in plain distance, its nearest point with error
feedback where calibration gives the Gram matrix; with a trellis (``trellis.py``) likewise, each
tile's least-error path (without the Gram matrix: under the input-weighted distance). (Rescaling rows
by least squares after that moved them off the distribution the codebook covers: on MiniLM the
held-out cosine fell from 0.74 to 0.53.) With training data and fine-tuning steps the assignments are then learned among
each sub-vector's nearest ``candidates`` by distillation with progressive freezing
(``progressive.py``); the codebook never changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .. import lattice, trellis, universal
from ..calibrate import InputStatistics
from ..coded import CodedWeight, CodeLayout
from ..errors import Unfit
from . import MethodConfig, register


@dataclass(frozen=True)
class VQ4AllConfig(MethodConfig):
    """``codebook``: the universal codebook file (.vqcb; default: the one the package ships,
    ``universal.DEFAULT``), or one made by a rule, by name (``e8p``: 2^16 points in 8 dimensions;
    ``trellis``: the bitshift trellis, 2, 3 or 4 bits per weight by the budget; both best on
    rotated weights,
    ``transform=hadamard``); ``candidates``: codewords
    each sub-vector's learned assignment chooses among."""

    method: ClassVar[str] = "vq4all"
    minimum: ClassVar[dict[str, float]] = {"candidates": 1}
    codebook: str | None = None
    candidates: int | None = None


class VQ4All:
    name = "vq4all"
    config = VQ4AllConfig
    learns_assignments = True  # progressively, when fine-tuned
    needs_training = False  # without training data: the nearest codeword under the fitted scales
    assignments = "progressive"
    #: No bias correction, and fits to the uncentred inputs: with a codebook fitted to no layer in
    #: particular, the error along the mean input is large, and a bias that cancels it on the
    #: calibration text overshoots on other text (MiniLM, held-out cosine 0.56 with the correction,
    #: 0.70 without, codebook from MiniLM alone; 0.16 with it for one from all three networks).
    corrects_bias = False
    #: The nearest codeword, as the method describes; its assignments are then learned (progressive).
    feedback = False

    def settings(self, shape: tuple[int, ...], bits: float | None, config: VQ4AllConfig) -> dict:
        book = universal.open_codebook(config.codebook or universal.DEFAULT)
        cols = math.prod(shape[1:])
        if cols % book.dim:
            raise Unfit(f"the universal codebook's sub-vector length d = {book.dim} does not divide the {cols} "
                        f"inputs of shape {tuple(shape)}")
        if book.trellis and cols % trellis.TILE:
            raise Unfit(f"the trellis codes tiles of {trellis.TILE} inputs, which do not divide the {cols} inputs of "
                        f"shape {tuple(shape)}")
        new_bits = book.trellis and _trellis_bits(bits, cols, book.trellis)
        cost = (new_bits or book.code_bits_per_weight) + 16 / cols
        if bits is not None and bits + 1e-9 < cost:
            raise Unfit(f"the universal codebook (k = {book.k}, d = {book.dim}) costs {cost:.3f} bits per weight on "
                        f"shape {tuple(shape)} (indices and row scales), above its budget of {bits:g} bits per weight")
        return {"codebook": book.sha256, "candidates": min(config.candidates or 4, book.k), "trellis": new_bits}

    def quick_settings(self, settings: dict) -> dict:
        """The fit the allocation measures a layer's sensitivity with: the real one (on sampled rows),
        as no stand-in codes like a lattice or a trellis."""
        return settings

    def layout(self, shape: tuple[int, ...], settings: dict) -> CodeLayout:
        _, k, dim = universal.table(settings["codebook"]).shape
        layout = CodeLayout(tuple(shape), k=k, dim=dim, scale_group=math.prod(shape[1:]),
                            codebook_sha256=settings["codebook"], trellis=settings.get("trellis", 0))
        layout.validate()
        return layout

    def fit(self, weight: Tensor, settings: dict, seed: int, inputs: InputStatistics | None = None) -> CodedWeight:
        layout = self.layout(tuple(weight.shape), settings)
        matrix = weight.reshape(layout.rows, layout.cols).float()
        importance = (torch.ones(1, layout.cols) if inputs is None else inputs.importance().cpu()).to(matrix)
        _, rms = universal.row_normalised(matrix)
        unassigned = torch.zeros(layout.rows, layout.segments, dtype=torch.int64)
        code = CodedWeight.encode(layout, universal.table(settings["codebook"]), unassigned, rms)
        structured = settings["codebook"] in lattice.STRUCTURED or settings.get("trellis")
        if structured and inputs is not None and inputs.gram is not None:
            code.reassign_with_feedback(matrix, inputs.gram)  # plain distance in the search: the feedback weighs errors
        else:
            code.reassign(matrix, importance)
        return code


def _trellis_bits(bits: float | None, cols: int, default: int) -> int:
    """A trellis's new bits per weight: the most the budget pays for with the row scales
    (``trellis.NEW_BITS``), the codebook's own without a budget or below the least."""
    paid = [k for k in trellis.NEW_BITS if bits is not None and k + 16 / cols <= bits + 1e-9]
    return max(paid, default=default)


register(VQ4All())
