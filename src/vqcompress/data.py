"""Calibration and training data, chosen by the source model: a task and a batch for every step.

- zoo models (``fashion-cnn``, ``fashion-vit``): Fashion-MNIST training images with labels;
- ``minilm`` (an encoder): sentences, by default of ``lee_background.cor`` (news; the
  evaluation uses other texts);
- PP-OCR's recognizer (``ppocr-rec``): news lines rendered as its suite renders them, but other
  lines (``suites.ppocr.calibration_batches``); its direction classifier has none, since much of
  it stays dense and a calibrated run's model average could not be met (docs/methods.md);
- Silero VAD (``silero-vad``): news lines spoken by ``espeak-ng`` (``suites.silero.calibration_batches``;
  its suite listens to ALSA's recorded voices);
- a causal LM (``gemma-270m``): windows of ``text.WINDOW`` tokens of running text, by default of
  the shortened English Wikipedia dump in gensim's test data (the perplexity suite reads
  ``lee_background.cor``, so calibration and evaluation never share text).

The corpora come from gensim's test data (a wheel) and are registered by name in
``text.CORPORA``; text files and lists of texts go through ``text`` as they are.
"""

from __future__ import annotations

import bz2
import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import VQCError
from .finetune import TrainingData, classification_task
from .memory import release_free_memory
from .text import (
    CORPORA,
    DEFAULT_SAMPLES,
    calibration_batch_count,
    causal_lm_data,
    dividing_batch_size,
    epoch_order,
    pool_size,
    text_training_data,
)

#: The gensim test files are Windows-1252 (a pound sign, em dashes, accents).
ENCODING = "cp1252"
#: bundled networks whose suites make their calibration examples (``example_data``): name → lines by default
EXAMPLE_DATA = {"ppocr-rec": 64, "silero-vad": 24}


class NoData(VQCError):
    """No calibration data is known for a model (a folder without a tokenizer, a plain module)."""


def data_dir() -> Path:
    """The gensim test_data folder, found without importing gensim (whose
    compiled parts may not match the installed numpy)."""
    spec = importlib.util.find_spec("gensim")
    folder = Path(spec.submodule_search_locations[0]) / "test" / "test_data" if spec else None
    if folder is None or not (folder / "lee.cor").is_file():
        raise VQCError("this needs gensim's test data: pip install --no-deps gensim")
    return folder


def lee_background() -> str:
    """The whole of lee_background.cor (300 Australian news articles, one a line)."""
    return (data_dir() / "lee_background.cor").read_text(encoding=ENCODING)


def _wiki_text() -> str:
    """Running text of gensim's shortened English Wikipedia dump: XML and wiki markup stripped."""
    path = next(data_dir().glob("enwiki-latest-pages-articles1.xml-*-shortened.bz2"))
    xml = bz2.decompress(path.read_bytes()).decode("utf-8", errors="replace")
    pages = re.findall(r"<text[^>]*>(.*?)</text>", xml, flags=re.S)
    text = "\n".join(pages)
    for pattern, replacement in ((r"\{\{.*?\}\}", ""), (r"&lt;.*?&gt;", ""), (r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1"),
                                 (r"&[a-z]+;", " "), (r"'{2,}", ""), (r"=+[^=\n]*=+", ""), (r"[ \t]+", " ")):
        text = re.sub(pattern, replacement, text, flags=re.S)
    return text


CORPORA.update({"lee-background": lee_background, "wiki": _wiki_text})


def fashion_training_data(seed: int = 0, batch_size: int = 128, samples: int | None = None) -> TrainingData:
    from .models.fashion import load_split

    images, labels = load_split("train")
    size = pool_size(len(images), samples, "images", "fashion")
    batch_size = dividing_batch_size(size, samples, batch_size)
    order = epoch_order(size, seed, batch_size)
    return TrainingData(classification_task(), lambda step: (images[order(step)], labels[order(step)]),
                        calibration_batches=calibration_batch_count(size, samples, "images", batch_size))


def _example_batches(name: str) -> tuple[str, Callable[[int], list[torch.Tensor]]]:
    """A bundled network's calibration examples: the ``--calib`` name they go by and the batches
    its suite makes of that many lines (``EXAMPLE_DATA``)."""
    from .suites import ppocr, silero

    return {"ppocr-rec": ("text-lines", ppocr.calibration_batches), "silero-vad": ("speech", silero.calibration_batches)}[name]


def example_data(name: str, calib: str | None = None, samples: int | None = None) -> TrainingData:
    """A bundled network's calibration examples (``EXAMPLE_DATA``), its outputs matched as
    ``inputs.infer_task`` matches a tensor's (a softmax's by its KL); where the examples cannot be
    made (a tool missing) there are none (``NoData``: the run is then data-free, said)."""
    from .inputs import infer_task

    kind, batches_of = _example_batches(name)
    if calib not in (None, kind):
        raise VQCError(f"{name} calibrates on its {kind} only (--calib {kind}), not {calib!r}")
    try:
        batches = batches_of(samples or EXAMPLE_DATA[name])
    except VQCError as error:
        raise NoData(str(error)) from None
    return TrainingData(infer_task(None, batches[0]), lambda step: batches[step % len(batches)],
                        calibration_batches=len(batches))


def training_data(source: dict, seed: int = 0, calib: str | None = None, samples: int | None = None,
                  limit: int = DEFAULT_SAMPLES["causal"]) -> TrainingData:
    """The calibration / fine-tuning data that suits a model from ``source`` (see the module
    docstring): ``calib`` a corpus name or text file (default: the model's own), ``samples``
    how many sentences, windows or images (a causal LM's windows: by default all the text gives,
    up to ``limit``)."""
    if source["kind"] == "zoo":
        if calib not in (None, "fashion"):
            raise VQCError(f"{source['name']} calibrates on Fashion-MNIST images only (--calib fashion), not {calib!r}")
        return fashion_training_data(seed, samples=samples)
    if source["kind"] == "bundled" and source["name"] in EXAMPLE_DATA:
        return example_data(source["name"], calib, samples)
    from .models import model_folder

    folder = model_folder(source) if source["kind"] in ("bundled", "folder") else None
    if folder is None or not any(folder.glob("tokenizer*")):
        raise NoData(f"no calibration or fine-tuning data is known for {source['name']!r} (no tokenizer in its "
                     "folder): use the Python API with calibration=[example inputs …]")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if source.get("architecture", "").endswith("ForCausalLM"):
        data = causal_lm_data(tokenizer, seed, calib=calib or "wiki", samples=samples, limit=limit)
    else:
        data = text_training_data(tokenizer, seed, calib=calib or "lee-background", samples=samples)
    del tokenizer
    release_free_memory()  # Gemma's tokenizer and a corpus tokenized at once: 230 MB of holes
    return data
