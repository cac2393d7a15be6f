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

import torch
from torch import Tensor, nn

from .codebook import nearest_candidates
from .coded import pack_codes

THRESHOLD = 0.99  # a sub-vector this sure of one candidate is frozen to it
#: Softmax temperature at the start and at the freeze point, annealed geometrically between: at
#: 0.25 the nearest candidate already leads clearly, at 0.01 practically every mixture is one-hot.
TEMPERATURES = (0.25, 0.01)
LOGIT_LR = 0.05  # Adam step for the logits: they live on a scale of ~1, the weights' on ~0.01


class CandidateAssignment(nn.Module):
    """The learned choice among each sub-vector's candidates, for one ``CodedWeight`` (stored row
    order). ``CodedWeight.decode_rows`` asks it for codeword-unit values while it is attached."""

    def __init__(self, code: nn.Module, weight: Tensor, n: int):
        super().__init__()
        lay = code.layout
        n = min(n, lay.k)
        stored = torch.arange(lay.rows, device=code.codes.device)
        matrix = weight.detach().float().reshape(lay.rows, lay.cols)[code.permutation()]
        points = code._in_codeword_units(matrix, stored).reshape(lay.rows, lay.segments, lay.dim)
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

    def forward(self, stored: Tensor, codebooks: Tensor, group_of_row: Tensor) -> Tensor:
        """(len(stored), segments, d) values in codeword units: the candidates' mixtures."""
        words = codebooks[group_of_row[:, None, None], self.candidates[stored].long()]  # (rows, segments, n, d)
        return (self.probabilities(stored).to(words.dtype)[..., None] * words).sum(-2)

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


def attach(code: nn.Module, weight: Tensor, n: int) -> CandidateAssignment:
    """Start learning ``code``'s assignment among the ``n`` codewords nearest to ``weight``."""
    code.assigner = CandidateAssignment(code, weight, n)
    return code.assigner


def detach(code: nn.Module) -> None:
    """Freeze whatever is still soft, store the chosen codes, drop the candidates."""
    code.assigner.freeze(0.0)
    code.codes = pack_codes(code.assigner.codes(), code.layout.bits).to(code.codes.device)
    code.assigner = None
