"""Learned candidate assignments with progressive freezing (VQ4ALL's way of choosing codes).

Each sub-vector keeps its ``n`` nearest codewords as candidates, with logits initialised from
the distances (z_i = log(d_n / d_i): the nearest leads, the n-th starts at 0). While training,
its value is the softmax mixture of its candidates, p = softmax(z / τ), with τ annealed from
``TEMPERATURES[0]`` to ``TEMPERATURES[1]``; a regulariser, mean p(1 − p), pushes each mixture
towards one-hot too. (Without the annealing, a short run keeps blurred mixtures that the final
freeze then breaks: on MiniLM the loss tripled at the freeze.) A sub-vector whose largest probability passes ``THRESHOLD`` is frozen
to that candidate for good; a layer whose sub-vectors are all frozen is hard. The codebook is not
touched (a universal codebook never trains), so all that moves are the logits and whatever
else the fine-tuning engine trains (scales, norms, biases).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .assign import FREEZE_AT, Fixed
from .codebook import nearest_candidates
from .coded import pack_codes

THRESHOLD = 0.99  # a sub-vector this sure of one candidate is frozen to it
#: Softmax temperature at the start and at the freeze point, annealed geometrically between: at
#: 0.25 the nearest candidate already leads clearly, at 0.01 practically every mixture is one-hot.
TEMPERATURES = (0.25, 0.01)
LOGIT_LR = 0.05  # Adam step for the logits: they live on a scale of ~1, the weights' on ~0.01
#: Weight of the one-hot regulariser, reached linearly at the freeze; candidates per sub-vector
#: unless the layer's recipe says; steps between freezing passes.
ONE_HOT_WEIGHT = 0.5
CANDIDATES = 4
FREEZE_EVERY = 10


class CandidateAssignment(nn.Module):
    """The learned choice among each sub-vector's candidates, for one ``CodedWeight`` (stored row
    order), attached as its ``assigner``: ``decode_rows`` asks it for codeword-unit values."""

    hard = False  # the forward values are mixtures, not the stored codes'

    def __init__(self, code: nn.Module, weight: Tensor, n: int):
        super().__init__()
        lay = code.layout
        n = min(n, lay.k)
        stored = torch.arange(lay.rows, device=code.codes.device)
        matrix = weight.detach().float().reshape(lay.rows, lay.cols)[code.permutation()]
        points = code.in_codeword_units(matrix, stored).reshape(lay.rows, lay.segments, lay.dim)
        candidates, distances = nearest_candidates(points, torch.ones_like(points), code.codebook.detach().float(),
                                                   code.codebook_of_rows(stored), n)
        distances = distances.clamp_min(1e-12).sqrt()
        self.register_buffer("candidates", candidates.to(torch.int32))
        self.register_buffer("frozen", torch.zeros(lay.rows, lay.segments, dtype=torch.bool, device=stored.device))
        self.register_buffer("choice", torch.zeros(lay.rows, lay.segments, dtype=torch.int64, device=stored.device))
        self.logits = nn.Parameter((distances[..., -1:] / distances).log())
        self.temperature = TEMPERATURES[0]

    def probabilities(self, stored: Tensor | None = None) -> Tensor:
        """Softmax over the candidates; a frozen sub-vector's is one-hot at its choice."""
        logits = self.logits if stored is None else self.logits[stored]
        frozen = self.frozen if stored is None else self.frozen[stored]
        choice = self.choice if stored is None else self.choice[stored]
        hard = torch.nn.functional.one_hot(choice, logits.shape[-1]).to(logits.dtype)
        return torch.where(frozen[..., None], hard, torch.softmax(logits / self.temperature, -1))

    def codewords(self, code: nn.Module, rows: Tensor, stored: Tensor, dtype: torch.dtype) -> Tensor:
        """(len(stored), segments, d) values in codeword units: the candidates' mixtures."""
        words = code.codebook.to(dtype)[code.codebook_of_rows(stored)[:, None, None], self.candidates[stored].long()]
        return (self.probabilities(stored).to(words.dtype)[..., None] * words).sum(-2)  # words: (rows, segments, n, d)

    def adjust(self, code: nn.Module, rows: Tensor, values: Tensor) -> Tensor:
        return values

    def regulariser(self) -> Tensor:
        """Mean p(1 − p) over every candidate of every sub-vector: 0 when all are one-hot."""
        p = self.probabilities()
        return (p * (1 - p)).sum(-1).mean()

    @torch.no_grad()
    def freeze(self, threshold: float = THRESHOLD) -> None:
        """Freeze every sub-vector that is at least ``threshold`` sure (0: all of them, to their
        most likely candidate)."""
        p = torch.softmax(self.logits / self.temperature, -1)
        sure, best = p.max(-1)
        new = ~self.frozen & (sure >= threshold)
        self.choice[new] = best[new]
        self.frozen |= new

    def anneal(self, progress: float) -> None:
        """Set the temperature for ``progress`` (0 … 1) of the way to the freeze point."""
        first, last = TEMPERATURES
        self.temperature = first * (last / first) ** min(1.0, progress)

    def frozen_share(self) -> float:
        return float(self.frozen.float().mean())

    def codes(self) -> Tensor:
        """The chosen codeword of every sub-vector (call after freezing all)."""
        return self.candidates.long().gather(-1, self.choice[..., None]).squeeze(-1)


class Progressive(Fixed):
    """Candidate assignments for every coded weight (``assign``'s strategy protocol): logits at
    their own step size, annealed with the one-hot regulariser, sure sub-vectors frozen every
    ``FREEZE_EVERY`` steps and all of them at the freeze point."""

    def __init__(self, codes: dict[str, nn.Module], originals: dict[str, Tensor]):
        super().__init__(codes)
        for name, code in codes.items():
            code.assigner = CandidateAssignment(code, originals[name], code.recipe.get("candidates", CANDIDATES))
        self.hard_layers: set[str] = set()  # layers whose sub-vectors are all frozen

    def logits(self) -> list[nn.Parameter]:
        return [code.assigner.logits for code in self.codes.values()]

    def penalty(self, step: int, steps: int) -> Tensor | float:
        """This step's temperature and the one-hot regulariser, weighted up to the freeze."""
        if step >= FREEZE_AT * steps:
            return 0.0
        for code in self.codes.values():
            code.assigner.anneal(step / (FREEZE_AT * steps))
        weight = ONE_HOT_WEIGHT * step / (FREEZE_AT * steps)
        return weight * sum(code.assigner.regulariser() for code in self.codes.values()) / len(self.codes)

    def after_step(self, step: int, steps: int, loss: Callable[[], float], progress: bool) -> dict[str, str]:
        """Freeze the sure sub-vectors (all of them from the freeze point); returns the share
        frozen, the layers hard and the least frozen, and says each layer as it becomes hard."""
        if step + 1 >= FREEZE_AT * steps or (step + 1) % FREEZE_EVERY == 0:
            for code in self.codes.values():
                code.assigner.freeze(0.0 if step + 1 >= FREEZE_AT * steps else THRESHOLD)
        shares = {name: code.assigner.frozen_share() for name, code in self.codes.items()}
        sizes = {name: code.layout.rows * code.layout.segments for name, code in self.codes.items()}
        newly_hard = [n for n, share in shares.items() if share == 1.0 and n not in self.hard_layers]
        self.hard_layers.update(newly_hard)
        for name in newly_hard if progress else []:
            softest = ", ".join(f"{n} {v:.0%}" for v, n in sorted((v, n) for n, v in shares.items() if n not in self.hard_layers)[:3])
            tqdm.write(f"step {step + 1}: {name} is hard ({len(self.hard_layers)}/{len(shares)})"
                       + (f"; least frozen: {softest}" if softest else ""), file=sys.stderr)
        least = min(shares, key=shares.get)
        return {"frozen": f"{sum(shares[n] * sizes[n] for n in shares) / sum(sizes.values()):.0%}",
                "hard": f"{len(self.hard_layers)}/{len(shares)}", "least": f"{least} {shares[least]:.0%}"}

    def finish(self) -> None:
        """Freeze whatever is still soft and store the chosen codes."""
        for code in self.codes.values():
            code.assigner.freeze(0.0)
            code.codes = pack_codes(code.assigner.codes(), code.layout.bits).to(code.codes.device)
        super().finish()
