"""The ``ppocr-rec`` and ``ppocr-cls`` quality suites: text lines rendered here, read back.

The lines are consecutive words of gensim's ``lee_background.cor`` (news), at most
``LINE_CHARS`` characters each, drawn black on white by PIL at 32 px on a 48-px line in DejaVu
Sans, Serif and Sans Mono by turns (fonts matplotlib ships). Each is prepared as RapidOCR
prepares a crop: scaled to height 48, width by its aspect ratio, pixels to [-1, 1], padded
with zeros to the model's width (at least 320 for the recognizer; the classifier's 192, wider
lines squeezed into it).

- ``ppocr-rec``: ``exact`` — percent of lines read exactly as written (CTC greedy decoding
  over the model's own character list); ``same`` — percent read exactly as the fp32 model
  reads them (the bar a compressed recognizer must meet).
- ``ppocr-cls``: every other line is turned by 180°; ``accuracy`` — percent of lines whose
  direction (the larger of the two outputs) is right; ``agreement`` — percent decided as fp32
  decides them.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import VQCError

LINE_CHARS = 28
LINES = 100  # the suite's sample: about 10 s per model on one core
CALIBRATION_FROM = 500  # calibration lines (``calibration_batches``) start here, far from the suite's
FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")
HEIGHT, REC_WIDTH, CLS_WIDTH = 48, 320, 192


@lru_cache(maxsize=1)
def text_lines() -> tuple[str, ...]:
    """Every line of ``lee_background.cor``'s words, in order, none longer than ``LINE_CHARS``."""
    from ..data import lee_background

    lines, line = [], ""
    for word in lee_background().split():
        if line and len(line) + 1 + len(word) > LINE_CHARS:
            lines.append(line)
            line = ""
        line = f"{line} {word}" if line else word
    return tuple(lines)


def render(text: str, font: str):
    """``text`` as a white RGB image 48 px high, the glyphs 32 px, 8 px of margin each side."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    face = ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / font), 32)
    left, top, right, bottom = face.getbbox(text)
    image = Image.new("RGB", (right - left + 16, HEIGHT), "white")
    ImageDraw.Draw(image).text((8 - left, (HEIGHT - (bottom - top)) // 2 - top), text, font=face, fill="black")
    return image


def prepare(image, width: int, squeeze: bool) -> Tensor:
    """RapidOCR's crop preparation: (3, 48, W) in [-1, 1], zero-padded on the right; W is
    ``width``, or (``squeeze`` False) the line's own width where it is wider."""
    from PIL import Image

    scaled = math.ceil(HEIGHT * image.width / image.height)
    if squeeze:
        scaled = min(scaled, width)
    pixels = np.asarray(image.resize((scaled, HEIGHT), Image.BILINEAR), dtype=np.float32).transpose(2, 0, 1)
    out = torch.zeros(3, HEIGHT, max(width, scaled))
    out[:, :, :scaled] = torch.from_numpy(pixels / 127.5 - 1)
    return out


def samples(count: int) -> list[tuple[str, object]]:
    """The first ``count`` lines with their images (fonts by turns)."""
    lines = text_lines()
    if not 1 <= count <= len(lines):
        raise VQCError(f"the text has {len(lines)} lines; ask for 1 to {len(lines)}, not {count}")
    return [(text, render(text, FONTS[i % len(FONTS)])) for i, text in enumerate(lines[:count])]


def calibration_batches(count: int, batch_size: int = 8) -> list[Tensor]:
    """``count`` lines the suite never reads (from ``CALIBRATION_FROM`` on), prepared as the
    recognizer's inputs, in batches."""
    lines = text_lines()[CALIBRATION_FROM:CALIBRATION_FROM + count]
    if len(lines) < count:
        raise VQCError(f"the text has {len(text_lines()) - CALIBRATION_FROM} calibration lines, not {count}")
    images = [render(text, FONTS[i % len(FONTS)]) for i, text in enumerate(lines)]
    return list(torch.stack([prepare(image, REC_WIDTH, True) for image in images]).split(batch_size))


def ctc_greedy(probabilities: Tensor, characters: list[str]) -> str:
    """Best path decoding: the most likely class per step, repeats merged, blanks (class 0) dropped."""
    best = probabilities.argmax(-1).tolist()
    return "".join(characters[c] for i, c in enumerate(best) if c and (i == 0 or c != best[i - 1]))


@torch.no_grad()
def read_lines(model: nn.Module, images: list, characters: list[str], device: str = "cpu") -> list[str]:
    """What the recognizer reads on each image, one line per call (as RapidOCR pads alone)."""
    model.eval().to(device)
    return [ctc_greedy(model(prepare(image, REC_WIDTH, False)[None].to(device))[0], characters) for image in images]


@torch.no_grad()
def directions(model: nn.Module, images: list, device: str = "cpu") -> list[int]:
    """The classifier's decision per image: 0 upright, 1 turned by 180°."""
    model.eval().to(device)
    batch = torch.stack([prepare(image, CLS_WIDTH, True) for image in images]).to(device)
    return model(batch).argmax(-1).tolist()


def _percent(hits: list[bool]) -> float:
    return round(100 * sum(hits) / len(hits), 2)


def evaluate_rec(model: nn.Module, reference: nn.Module | None = None, lines: int = LINES,
                 device: str = "cpu") -> dict[str, float]:
    """``exact`` (vs the text) and ``same`` (vs ``reference``'s reading, 100 without one), in percent."""
    from ..models.pretrained import characters, weights_file

    chars = characters(weights_file("ppocr-rec"))
    texts, images = zip(*samples(lines))
    read = read_lines(model, images, chars, device)
    same = read if reference is None else read_lines(reference, images, chars, device)
    return {"exact": _percent([a == b for a, b in zip(read, texts)]), "same": _percent([a == b for a, b in zip(read, same)])}


def evaluate_cls(model: nn.Module, reference: nn.Module | None = None, lines: int = LINES,
                 device: str = "cpu") -> dict[str, float]:
    """``accuracy`` (vs the true direction) and ``agreement`` (vs ``reference``), in percent."""
    truth = [i % 2 for i in range(lines)]
    images = [image.rotate(180) if turned else image for (_, image), turned in zip(samples(lines), truth)]
    decided = directions(model, images, device)
    other = decided if reference is None else directions(reference, images, device)
    return {"accuracy": _percent([a == b for a, b in zip(decided, truth)]),
            "agreement": _percent([a == b for a, b in zip(decided, other)])}
