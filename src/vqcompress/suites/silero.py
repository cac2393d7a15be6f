"""The ``silero-vad`` quality suite: speech decisions on real voice recordings.

The clips are ALSA's speaker-test voices (Debian's ``alsa-utils``: eight spoken channel names
and one noise burst, 48 kHz), taken to 16 kHz and joined with half a second of silence between
them, about 17 s in all: 520 windows of 512 samples (32 ms), each read with the 64 samples
before it and the LSTM state carried, as Silero runs.

``agreement``: percent of windows decided (probability > 0.5) as the fp32 model decides them;
``speech``: percent of windows decided as speech; ``error``: mean absolute difference of the
probabilities from fp32's, in points.

Calibration never uses these clips: ``calibration_batches`` speaks news lines (other than the
PP-OCR suite's) through Debian's ``espeak-ng``, in two voices and four speeds.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import VQCError

CLIPS = Path("/usr/share/sounds/alsa")
INSTALL = "apt-get install alsa-utils"
SPEAKER, SPEAKER_INSTALL = "espeak-ng", "apt-get install espeak-ng"
SPOKEN_FROM = 500  # the news lines spoken for calibration start here (ppocr's suite reads the first 100)
RATE, WINDOW, CONTEXT, GAP = 16_000, 512, 64, 8_000


def _read(path: Path) -> np.ndarray:
    """A 16-bit mono WAV file as float samples at 16 kHz."""
    from scipy.signal import resample_poly

    with wave.open(str(path)) as clip:
        if clip.getsampwidth() != 2 or clip.getnchannels() != 1:
            raise VQCError(f"{path} is not 16-bit mono")
        rate, raw = clip.getframerate(), clip.readframes(clip.getnframes())
    samples = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768
    return resample_poly(samples, RATE, rate).astype(np.float32)


@lru_cache(maxsize=1)
def audio() -> Tensor:
    """All clips at 16 kHz, in name order, with ``GAP`` samples of silence after each."""
    paths = sorted(CLIPS.glob("*.wav"))
    if not paths:
        raise VQCError(f"the silero-vad suite needs the speech clips in {CLIPS}: {INSTALL}")
    gap = np.zeros(GAP, np.float32)
    return torch.from_numpy(np.concatenate([part for path in paths for part in (_read(path), gap)]))


def spoken(lines: list[str]) -> Tensor:
    """``lines`` spoken by ``espeak-ng`` (voices and speeds by turns) at 16 kHz, with ``GAP``
    samples of silence after each."""
    if shutil.which(SPEAKER) is None:
        raise VQCError(f"calibrating silero-vad speaks text through {SPEAKER}: {SPEAKER_INSTALL}")
    parts, gap = [], np.zeros(GAP, np.float32)
    with tempfile.TemporaryDirectory() as folder:
        for i, text in enumerate(lines):
            path = Path(folder) / f"{i}.wav"
            subprocess.run([SPEAKER, "-v", ("en-us", "en-gb")[i % 2], "-s", str(140 + 10 * (i % 4)), "-w", str(path), text],
                           check=True, capture_output=True)
            parts += [_read(path), gap]
    return torch.from_numpy(np.concatenate(parts))


def windows(samples: Tensor) -> Tensor:
    """Every whole ``WINDOW`` of ``samples`` with the ``CONTEXT`` samples before it: the model's inputs."""
    padded = torch.cat([torch.zeros(CONTEXT), samples[: len(samples) // WINDOW * WINDOW]])
    return torch.stack([padded[start - CONTEXT:start + WINDOW] for start in range(CONTEXT, len(padded), WINDOW)])


def calibration_batches(lines: int = 24, batch_size: int = 64) -> list[Tensor]:
    """Windows of ``lines`` news lines spoken (see the module), in batches; each window is read
    from a fresh state."""
    from .ppocr import text_lines

    return list(windows(spoken(list(text_lines()[SPOKEN_FROM:SPOKEN_FROM + lines]))).split(batch_size))


@torch.no_grad()
def probabilities(model: nn.Module, samples: Tensor, device: str = "cpu") -> Tensor:
    """Speech probability of every whole ``WINDOW`` of ``samples``, run as a stream."""
    model.eval().to(device)
    state, out = None, []
    for window in windows(samples).to(device):
        probability, state = model(window[None], state)
        out.append(probability)
    return torch.cat(out).cpu()


def evaluate(model: nn.Module, reference: nn.Module | None = None, seconds: float | None = None,
             device: str = "cpu") -> dict[str, float]:
    """The suite's figures (see the module); ``seconds``: only the first seconds of the audio."""
    samples = audio() if seconds is None else audio()[: int(seconds * RATE)]
    p = probabilities(model, samples, device)
    q = p if reference is None else probabilities(reference, samples, device)
    return {"agreement": round(100 * ((p > 0.5) == (q > 0.5)).float().mean().item(), 2),
            "speech": round(100 * (p > 0.5).float().mean().item(), 2),
            "error": round(100 * (p - q).abs().mean().item(), 3)}
