"""Calibration and training data, chosen by the source model: a task and a batch for every step.

- zoo models (``fashion-cnn``, ``fashion-vit``): Fashion-MNIST training images with labels;
- ``minilm`` (an encoder): sentences, by default of ``lee_background.cor`` (news; the
  evaluation uses other texts);
- PP-OCR's recognizer (``ppocr-rec``): news lines rendered as its suite renders them, but other
  lines (``suites.ppocr.calibration_batches``); its direction classifier has none, since much of
  it stays dense and a calibrated run's model average could not be met (docs/methods.md);
- Silero VAD (``silero-vad``): news lines spoken by ``espeak-ng`` (``suites.silero.calibration_batches``;
  its suite listens to ALSA's recorded voices);
- a causal LM (``gemma-270m``): windows of ``WINDOW`` tokens of running text, by default of the
  shortened English Wikipedia dump in gensim's test data (the perplexity suite reads
  ``lee_background.cor``, so calibration and evaluation never share text).

Text comes from a named corpus (``CORPORA``) or a UTF-8 text file (``--calib FILE``).
``batch_at(step)`` depends only on the step and the seed (a fixed shuffle per epoch), so a
resumed run sees exactly the batches an uninterrupted one would; calibration statistics use the
first ``calibration_batches`` batches, which together hold the ``samples`` asked for (the batch
size is then the largest divisor of that count up to the usual one).
"""

from __future__ import annotations

import bz2
import re
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch

from .errors import VQCError
from .finetune import TrainingData, causal_lm_task, classification_task, encoder_task
from .memory import release_free_memory

WINDOW = 512  # tokens per causal-LM sample
DEFAULT_SAMPLES = {"encoder": 128, "causal": 64, "images": 1024}
#: bundled networks whose suites make their calibration examples (``example_data``): name → lines by default
EXAMPLE_DATA = {"ppocr-rec": 64, "silero-vad": 24}


class NoData(VQCError):
    """No calibration data is known for a model (a folder without a tokenizer, a plain module)."""


def _epoch_order(size: int, seed: int, batch_size: int):
    """step → the indices of that step's batch: a new seeded permutation every epoch, last partial batch dropped."""
    per_epoch = max(1, size // batch_size)

    @lru_cache(maxsize=2)
    def permutation(epoch: int) -> torch.Tensor:
        return torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))

    def indices(step: int) -> torch.Tensor:
        epoch, position = divmod(step, per_epoch)
        return permutation(epoch)[position * batch_size:(position + 1) * batch_size]

    return indices


def _sentences(text: str) -> list[str]:
    """Sentences of at least five words."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 5]


def _wiki_text() -> str:
    """Running text of gensim's shortened English Wikipedia dump: XML and wiki markup stripped."""
    from .suites.minilm import data_dir

    path = next(data_dir().glob("enwiki-latest-pages-articles1.xml-*-shortened.bz2"))
    xml = bz2.decompress(path.read_bytes()).decode("utf-8", errors="replace")
    pages = re.findall(r"<text[^>]*>(.*?)</text>", xml, flags=re.S)
    text = "\n".join(pages)
    for pattern, replacement in ((r"\{\{.*?\}\}", ""), (r"&lt;.*?&gt;", ""), (r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1"),
                                 (r"&[a-z]+;", " "), (r"'{2,}", ""), (r"=+[^=\n]*=+", ""), (r"[ \t]+", " ")):
        text = re.sub(pattern, replacement, text, flags=re.S)
    return text


def _lee_background() -> str:
    from .suites.gemma import text  # one reader of the file, shared with the perplexity suite

    return text()


CORPORA = {"lee-background": _lee_background, "wiki": _wiki_text}


def calibration_text(calib: str | list[str]) -> str:
    """The text of a named corpus, of a UTF-8 text file or of a list of texts (one after another);
    an empty one is refused."""
    if isinstance(calib, list):
        text = "\n\n".join(calib)
    elif calib in CORPORA:
        text = CORPORA[calib]()
    else:
        path = Path(calib)
        if not path.is_file():
            raise VQCError(f"calibration data {calib!r} is neither a file nor a corpus ({', '.join(CORPORA)})")
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as error:
            raise VQCError(f"cannot read calibration file {calib} as UTF-8 text ({error})") from None
    if not text.strip():
        raise VQCError(f"calibration data {_named(calib)} holds no text")
    return text


def _named(calib: str | list[str]) -> str:
    return f"({len(calib)} texts)" if isinstance(calib, list) else repr(calib)


def training_sentences(calib: str | list[str] = "lee-background") -> list[str]:
    """Sentences of ``calib``: a corpus split at sentence ends, a file's non-empty lines, or the
    given texts."""
    if isinstance(calib, list):
        return [line.strip() for line in calib if line.strip()]
    text = calibration_text(calib)
    return _sentences(text) if calib in CORPORA else [line.strip() for line in text.splitlines() if line.strip()]


def _enough(available: int, samples: int | None, what: str, calib: str) -> int:
    """The pool size: all that are available unless fewer are asked for (more is refused)."""
    if samples is not None and samples < 1:
        raise VQCError(f"--calib-samples must be ≥ 1, got {samples}")
    if available == 0:
        raise VQCError(f"calibration data {_named(calib)} gives no {what}")
    if samples is not None and samples > available:
        raise VQCError(f"calibration data {_named(calib)} gives {available} {what}, fewer than the {samples} asked for")
    return available if samples is None else samples


def _batch_size(size: int, samples: int | None, batch_size: int) -> int:
    """With a pool of exactly ``samples``, the largest batch size up to ``batch_size`` that divides
    it, so the calibration batches hold every sample once."""
    return batch_size if samples is None else max(b for b in range(1, min(batch_size, size) + 1) if size % b == 0)


def _calibration_batches(size: int, samples: int | None, kind: str, batch_size: int) -> int:
    """Batches that hold the calibration samples: all ``samples`` asked for, else the kind's default
    (fine-tuning still draws from the whole pool)."""
    return max(1, min(size, samples or DEFAULT_SAMPLES[kind]) // batch_size)


def fashion_training_data(seed: int = 0, batch_size: int = 128, samples: int | None = None) -> TrainingData:
    from .models.fashion import load_split

    images, labels = load_split("train")
    size = _enough(len(images), samples, "images", "fashion")
    batch_size = _batch_size(size, samples, batch_size)
    order = _epoch_order(size, seed, batch_size)
    return TrainingData(classification_task(), lambda step: (images[order(step)], labels[order(step)]),
                        calibration_batches=_calibration_batches(size, samples, "images", batch_size))


def text_training_data(tokenizer, seed: int = 0, batch_size: int = 32, max_tokens: int = 128,
                       calib: str = "lee-background", samples: int | None = None) -> TrainingData:
    """Sentence batches for an encoder; with ``samples``, a fixed pool of that many sentences."""
    sentences = training_sentences(calib)
    if not any(tokenizer(sentences[:64], add_special_tokens=False)["input_ids"]):
        raise VQCError(f"calibration data {_named(calib)} tokenizes to nothing")
    size = _enough(len(sentences), samples, "sentences", calib)
    pool = sentences if samples is None else [sentences[i] for i in _epoch_order(len(sentences), seed, size)(0).tolist()]
    batch_size = _batch_size(size, samples, batch_size)
    order = _epoch_order(size, seed, batch_size)

    def batch_at(step: int) -> dict:
        texts = [pool[i] for i in order(step).tolist()]
        return dict(tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"))

    return TrainingData(encoder_task(), batch_at,
                        calibration_batches=_calibration_batches(size, samples, "encoder", batch_size))


def causal_lm_data(tokenizer, seed: int = 0, batch_size: int = 4, calib: str = "wiki",
                   samples: int | None = None, limit: int = DEFAULT_SAMPLES["causal"]) -> TrainingData:
    """Windows of ``WINDOW`` tokens of running text for a causal LM (each starts with BOS when
    the tokenizer adds one): ``samples`` of them, by default as many as the text gives up to
    ``limit``."""
    ids = tokenizer(calibration_text(calib), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if not len(ids):
        raise VQCError(f"calibration data {_named(calib)} tokenizes to nothing")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    step = WINDOW - len(bos)
    windows = [torch.cat([torch.tensor(bos, dtype=ids.dtype), ids[i:i + step]]) for i in range(0, len(ids) - step + 1, step)]
    size = _enough(len(windows), samples, f"windows of {WINDOW} tokens", calib)
    size = size if samples else min(size, limit)
    pool = torch.stack(windows)[:size]
    batch_size = _batch_size(size, size, batch_size)
    order = _epoch_order(size, seed, batch_size)
    return TrainingData(causal_lm_task(), lambda s: {"input_ids": pool[order(s)]}, calibration_batches=size // batch_size,
                        token_counts=torch.bincount(ids))


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
