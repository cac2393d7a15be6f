"""`python -m benchmarks.trellis`: the bitshift-trellis prototype behind docs/methods.md's figures
(issue 31): relative squared error on a unit Gaussian at 2 bits per weight, for 2^8, 2^12 and 2^16
states, with a free first state and tail-biting. Not a vqcompress form yet: the Viterbi here is torch
(seconds for these few thousand weights, hours for a network); the form needs it in the kernel.

A state is 16 (L) bits; each weight shifts in 2 new bits, so its code overlaps its predecessor's in
L − 2 bits; a state's value is one of 2^L Gaussian quantiles in a seeded random order. Tail-biting:
the first state's overlap bits are the last state's (a second Viterbi pass with that constraint),
so a sequence costs exactly 2 bits per weight. Results go to benchmarks/results/trellis.json.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .run import machine, now, write_json

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "trellis.json"
STEP_BITS, LENGTH = 2, 256


def table(state_bits: int, seed: int = 0) -> torch.Tensor:
    """2^L Gaussian quantiles in a seeded random order."""
    n = 1 << state_bits
    quantiles = (torch.randperm(n, generator=torch.Generator().manual_seed(seed)).double() + 0.5) / n
    return (math.sqrt(2) * torch.erfinv(2 * quantiles - 1)).float()


def viterbi(x: torch.Tensor, values: torch.Tensor, state_bits: int, overlap: torch.Tensor | None = None) -> torch.Tensor:
    """The least-error state sequence (S × T) for sequences ``x`` (S × T); with ``overlap`` (S,), the
    first state's top bits and the last state's low bits are held to it (tail-biting)."""
    sequences, length = x.shape
    states, symbols = 1 << state_bits, 1 << STEP_BITS
    low = states // symbols
    every = torch.arange(states)[None]
    cost = (x[:, :1] - values[None]) ** 2
    if overlap is not None:
        cost = torch.where((every >> STEP_BITS) == overlap[:, None], cost, torch.full_like(cost, math.inf))
    back = torch.empty(length, sequences, low, dtype=torch.uint8)
    for t in range(1, length):
        best, back[t] = cost.view(sequences, symbols, low).min(1)
        cost = best.repeat_interleave(symbols, 1) + (x[:, t:t + 1] - values[None]) ** 2
    if overlap is not None:
        cost = torch.where((every & (low - 1)) == overlap[:, None], cost, torch.full_like(cost, math.inf))
    state = cost.argmin(1)
    path = torch.empty(sequences, length, dtype=torch.int64)
    path[:, -1] = state
    for t in range(length - 1, 0, -1):
        kept = state >> STEP_BITS
        state = (back[t].gather(1, kept[:, None])[:, 0].long() << (state_bits - STEP_BITS)) | kept
        path[:, t - 1] = state
    return path


def main() -> None:
    rows = []
    for state_bits, sequences in ((8, 64), (12, 64), (16, 24)):
        values = table(state_bits)
        x = torch.randn(sequences, LENGTH, generator=torch.Generator().manual_seed(1))
        free = viterbi(x, values, state_bits)
        tail = viterbi(x, values, state_bits, free[:, -1] & ((1 << (state_bits - STEP_BITS)) - 1))
        for name, path, bits in (("free first state", free, (STEP_BITS * (LENGTH - 1) + state_bits) / LENGTH),
                                 ("tail-biting", tail, STEP_BITS)):
            error = float((values[path] - x).square().sum() / x.square().sum())
            rows.append({"states": 1 << state_bits, "start": name, "bits_per_weight": bits, "relative_error": error,
                         "weights": x.numel()})
            print(rows[-1], flush=True)
    write_json(RESULTS, {"machine": machine(), "measured": now(), "sequence_length": LENGTH, "rows": rows})


if __name__ == "__main__":
    main()
