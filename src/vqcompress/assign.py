"""Ways of learning a coded weight's assignments while it trains: each wraps the coded weights of a
model for the length of a fine-tuning run and leaves hard codes behind.

A coded weight only stores a choice; while one of these strategies is attached (as
``CodedWeight.assigner``, one module per weight) the forward pass asks it for the codewords and
for the weight it shows the gradient. The fine-tuning engine drives the strategy per step:
``before_step`` (a temperature), ``penalty`` (a regulariser), ``after_step`` (a reassignment, a
freeze), ``finish`` (the codes stored, the strategy gone).

- ``Fixed``: the codes do not move (codebooks, scales, norms and biases still train).
- ``StraightThrough``: a latent dense weight takes the gradient of its quantized value; every
  ``reassign_every`` steps each sub-vector moves to its nearest codeword, kept only if the loss on
  the guard batches does not rise (Adam moves every latent weight about one step whatever its
  gradient, so a move can undo what training gained: docs/methods.md).
- ``Soft``: each sub-vector of the latent weight is the softmax mixture of its codebook's
  codewords (differentiable k-means), its temperature annealed to the freeze point.
- ``progressive.Progressive``: VQ4ALL's learned choice among each sub-vector's nearest candidates.

Assignments stop moving at ``FREEZE_AT`` of the steps, so the codebooks, scales and norms adapt to
the final choice during the rest.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

FREEZE_AT = 0.8
#: Soft assignments: temperature at the first step and just before the freeze, in units of the
#: layer's mean squared distance to the nearest codeword (1: a sub-vector midway between two
#: codewords mixes them almost evenly; 0.01: practically the nearest one).
SOFT_TEMPERATURES = (1.0, 0.01)


class LatentWeight(nn.Module):
    """A coded weight's latent dense weight while it trains (``CodedWeight.assigner``): straight
    through its quantized value, or, while ``temperature`` is set, the soft mixture of codewords."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.latent = nn.Parameter(weight.detach().float().clone())
        self.temperature: float | None = None

    @property
    def hard(self) -> bool:
        """Whether the forward values are the stored codes' (the compiled kernel may serve them)."""
        return self.temperature is None

    def codewords(self, code: nn.Module, rows: Tensor, stored: Tensor, dtype: torch.dtype) -> Tensor | None:
        """(rows, segments, d) values in codeword units, or None: the stored codes' codewords. Soft:
        the temperature is relative to the mean squared distance to the nearest codeword, so one
        schedule suits every layer; as it falls to 0 the mixture becomes the nearest codeword."""
        if self.temperature is None:
            return None
        lay = code.layout
        latent = self.latent.reshape(lay.rows, lay.cols)[rows].to(dtype)
        points = code.in_codeword_units(latent, stored).reshape(len(stored), lay.segments, lay.dim)
        codebooks = code.codebook.to(dtype)[code.codebook_of_rows(stored)]  # (rows, k, d)
        # |p - c|² less |p|², which is the same for every codeword of a segment: softmax ignores it
        partial = torch.baddbmm(codebooks.square().sum(-1)[:, None, :], points, codebooks.transpose(1, 2), alpha=-2)
        with torch.no_grad():
            unit = (points.square().sum(-1) + partial.min(-1).values).mean().clamp_min(torch.finfo(dtype).tiny)
        return torch.softmax(partial / (-self.temperature * unit), dim=-1) @ codebooks

    def adjust(self, code: nn.Module, rows: Tensor, values: Tensor) -> Tensor:
        """The decoded rows as the forward pass sees them: straight through to the latent weight."""
        if self.temperature is not None:
            return values
        latent = self.latent.reshape(code.layout.rows, code.layout.cols)[rows].to(values.dtype)
        return values + latent - latent.detach()

    def nearest(self, code: nn.Module) -> None:
        """Move every sub-vector of ``code`` to the codeword nearest its latent weight."""
        with torch.no_grad():
            code.reassign(self.latent)


class Fixed:
    """Codes that do not move: nothing attached, nothing to do."""

    def __init__(self, codes: dict[str, nn.Module]):
        self.codes = codes

    def logits(self) -> list[nn.Parameter]:
        """Parameters that train at their own step size (none here)."""
        return []

    def before_step(self, step: int, steps: int) -> None:
        pass

    def penalty(self, step: int, steps: int) -> Tensor | float:
        return 0.0

    def after_step(self, step: int, steps: int, loss: Callable[[], float], progress: bool) -> dict[str, str]:
        """Work between steps; returns what the progress bar shows."""
        return {}

    def finish(self) -> None:
        """Leave hard codes and no strategy attached."""
        for code in self.codes.values():
            code.assigner = None


class _Latent(Fixed):
    """A latent weight for every coded weight, from ``originals`` (best the uncompressed weights,
    which still know where each sub-vector lies inside its cell)."""

    def __init__(self, codes: dict[str, nn.Module], originals: dict[str, Tensor]):
        super().__init__(codes)
        for name, code in codes.items():
            code.assigner = LatentWeight(originals[name].reshape(code.layout.shape)).to(code.codes.device)


class StraightThrough(_Latent):
    """Straight-through latent weights, guarded reassignment every ``reassign_every`` steps."""

    def __init__(self, codes: dict[str, nn.Module], originals: dict[str, Tensor], reassign_every: int = 25):
        super().__init__(codes, originals)
        self.reassign_every = reassign_every

    def after_step(self, step: int, steps: int, loss: Callable[[], float], progress: bool) -> dict[str, str]:
        if (step + 1) % self.reassign_every == 0 and step < FREEZE_AT * steps:
            self._reassign_unless_worse(loss)
        return {}

    def _reassign_unless_worse(self, loss: Callable[[], float]) -> None:
        before, kept = loss(), [code.codes.clone() for code in self.codes.values()]
        for code in self.codes.values():
            code.assigner.nearest(code)
        if not loss() <= before:
            for code, codes_before in zip(self.codes.values(), kept):
                code.codes = codes_before


class Soft(_Latent):
    """Soft mixtures until the freeze, where each sub-vector takes its nearest codeword once; the
    temperature a pure function of the step (so a resumed run is exact)."""

    def before_step(self, step: int, steps: int) -> None:
        freeze = FREEZE_AT * steps
        if step >= freeze:
            self._harden()
            return
        first, last = SOFT_TEMPERATURES
        for code in self.codes.values():
            code.assigner.temperature = first * (last / first) ** (step / freeze)

    def _harden(self) -> None:
        """Each sub-vector to its nearest codeword, once (after that, straight through)."""
        for code in self.codes.values():
            if code.assigner.temperature is not None:
                code.assigner.nearest(code)
                code.assigner.temperature = None

    def finish(self) -> None:
        self._harden()  # a run too short to reach the freeze still ends with hard codes
        super().finish()
