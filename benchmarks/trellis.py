"""`python -m benchmarks.trellis`: the bitshift trellis behind docs/methods.md's figures (issue 31):
relative squared error on a unit Gaussian at 2 bits per weight, for 2^8, 2^12 and 2^16 states, with
a free first state and two ways of tail-biting: the overlap read off a first pass over the whole
sequence (QTIP's paper), and the form's own (`vqcompress.trellis.encode`: a free pass over the
seam where the sequence's ends meet, QTIP's code). Results go to benchmarks/results/trellis.json.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from vqcompress import trellis

from .run import machine, now, write_json

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "trellis.json"
SHIFT, LENGTH = trellis.SHIFT_BITS, 256


def table(state_bits: int, seed: int = 0) -> torch.Tensor:
    """2^L Gaussian quantiles in a seeded random order (the form's table at L = 16, without its fp16 rounding)."""
    n = 1 << state_bits
    quantiles = (torch.randperm(n, generator=torch.Generator().manual_seed(seed)).double() + 0.5) / n
    return (math.sqrt(2) * torch.erfinv(2 * quantiles - 1)).float()


def main() -> None:
    rows = []
    for state_bits, sequences in ((8, 64), (12, 64), (16, 24)):
        values = table(state_bits)
        x = torch.randn(sequences, LENGTH, generator=torch.Generator().manual_seed(1))
        free = trellis.viterbi(x, values, state_bits, SHIFT)
        first_pass = trellis.viterbi(x, values, state_bits, SHIFT, overlap=free[:, -1] & ((1 << (state_bits - SHIFT)) - 1))
        start = time.perf_counter()
        seam = trellis.encode(x, values, state_bits=state_bits, shift=SHIFT)
        seconds = time.perf_counter() - start
        for name, path, bits in (("free first state", free, (SHIFT * (LENGTH - 1) + state_bits) / LENGTH),
                                 ("tail-biting, first pass", first_pass, SHIFT),
                                 ("tail-biting, seam (the form)", seam, SHIFT)):
            error = float((values[path] - x).square().sum() / x.square().sum())
            row = {"states": 1 << state_bits, "start": name, "bits_per_weight": bits, "relative_error": error,
                   "weights": x.numel()}
            if path is seam:
                row |= {"encode_seconds": seconds, "backend": trellis.backend()}
            rows.append(row)
            print(row, flush=True)
    write_json(RESULTS, {"machine": machine(), "measured": now(), "sequence_length": LENGTH,
                         "threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
