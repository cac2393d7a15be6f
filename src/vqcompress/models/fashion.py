"""The small model zoo trained in the project on Fashion-MNIST: a CNN and a ViT.

Both are trained here, deterministically from a seed, and cached outside the repository
(``zoo_dir()``), so the ``fashion-cnn`` and ``fashion-vit`` suites have real trained weights
to compress without any download. Every weight matrix is a plain ``nn.Linear`` or ``nn.Conv2d``
whose input width (in_features, in_channels·kh·kw) is a multiple of 8, apart from the very
first conv (one input channel), so sub-vectors of d = 4 or 8 tile every row.
"""

from __future__ import annotations

import gzip
import json
import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..atomic import write_atomically, write_tensors
from ..cache import cache_dir
from ..errors import VQCError

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL = "apt-get install dataset-fashion-mnist"
FILES = {"train": "train", "test": "t10k"}
SIZES = {"train": 60_000, "test": 10_000}

# Pixel mean and std of the 60k training images (in [0, 1]); fixed so train and test agree.
MEAN, STD = 0.2860, 0.3530

# idx magic numbers: 0x0000 then dtype 0x08 (unsigned byte) then the number of dimensions.
IMAGE_MAGIC, LABEL_MAGIC = 0x00000803, 0x00000801


def read_idx(path: Path) -> np.ndarray:
    """The uint8 array stored in a gzipped idx file, its header checked against its length."""
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise VQCError(f"{path} is missing: {INSTALL}") from None
    except (OSError, EOFError, zlib.error) as error:
        raise VQCError(f"{path} is corrupt ({error}): reinstall it with {INSTALL} --reinstall") from None
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic not in (IMAGE_MAGIC, LABEL_MAGIC):
        raise VQCError(f"{path} is not an idx file of bytes (bad magic number): reinstall it with {INSTALL} --reinstall")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + math.prod(shape):
        raise VQCError(f"{path} holds {len(raw) - header} bytes of data, its header says {shape}: "
                       f"reinstall it with {INSTALL} --reinstall")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_split(split: str, root: Path = DATA_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) float32, normalised, and labels (N,) int64 of the train or test split."""
    if split not in FILES:
        raise VQCError(f"unknown Fashion-MNIST split {split!r}: train or test")
    images = read_idx(root / f"{FILES[split]}-images-idx3-ubyte.gz")
    labels = read_idx(root / f"{FILES[split]}-labels-idx1-ubyte.gz")
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1 or len(images) != len(labels):
        raise VQCError(f"the Fashion-MNIST {split} files in {root} do not match (images {images.shape}, "
                       f"labels {labels.shape}): reinstall them with {INSTALL} --reinstall")
    pixels = torch.from_numpy(images.copy()).float().div_(255).sub_(MEAN).div_(STD)
    return pixels.unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    """3×3 conv without bias (BatchNorm has one), then BatchNorm and ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class FashionCNN(nn.Module):
    """VGG-style: one 3×3 conv per resolution (28, 14, 7) with BatchNorm, then a hidden layer and 10 classes.

    One conv per stage and a pool right after the first keep a CPU epoch short; the widths
    double as the resolution halves.
    """

    def __init__(self, channels: tuple[int, int, int] = (16, 32, 64), hidden: int = 256, dropout: float = 0.3) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.features = nn.Sequential(
            _conv_bn(1, c1), nn.MaxPool2d(2), _conv_bn(c1, c2), nn.MaxPool2d(2), _conv_bn(c2, c3),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(c3 * 7 * 7, hidden), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(hidden, 10),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v and output projections as plain Linears."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)

        # Written out rather than F.scaled_dot_product_attention: with 49 tokens it trains faster on a CPU.
        scores = split(self.q(x)) @ split(self.k(x)).transpose(-1, -2) * (dim // self.heads) ** -0.5
        mixed = scores.softmax(-1) @ split(self.v(x))
        return self.out(mixed.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    """Pre-norm transformer block: attention then an MLP, each added back to the stream."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FashionViT(nn.Module):
    """7×7 patches → 16 tokens, learned positions, pre-norm blocks, mean-pooled linear head.

    7×7 rather than 4×4 patches: a third of the tokens trains about three times faster on a CPU,
    which buys the depth (6 blocks) that a 10-epoch budget needs to pass 88%.
    """

    def __init__(self, dim: int = 64, depth: int = 6, heads: int = 4, mlp_ratio: int = 2, patch: int = 7) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, patch, stride=patch)
        self.position = nn.Parameter(torch.randn(1, (28 // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(images).flatten(2).transpose(1, 2) + self.position
        return self.head(self.norm(self.blocks(tokens)).mean(1))


@dataclass(frozen=True)
class Spec:
    """How a zoo model is built and trained."""

    build: Callable[[], nn.Module]
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    target: float  # the test accuracy a trained model reaches (stated, and checked by the slow tests)
    label_smoothing: float = 0.0
    flip: bool = False  # random horizontal flips


ZOO = {
    "fashion-cnn": Spec(FashionCNN, epochs=7, batch_size=128, lr=3e-3, weight_decay=5e-4, target=0.92),
    "fashion-vit": Spec(FashionViT, epochs=10, batch_size=128, lr=2e-3, weight_decay=0.05, target=0.88,
                        label_smoothing=0.1, flip=True),
}


def _spec(name: str) -> Spec:
    if name not in ZOO:
        raise VQCError(f"unknown zoo model {name!r}: choose from {', '.join(ZOO)}")
    return ZOO[name]


def zoo_dir() -> Path:
    """Where trained zoo models are cached: ``$VQC_CACHE/zoo``, else ``~/.cache/vqcompress/zoo``."""
    return cache_dir() / "zoo"


def checkpoint_path(name: str, seed: int = 0, epochs: int | None = None) -> Path:
    """The cached checkpoint; a run with a non-standard epoch count is kept apart from the zoo model."""
    suffix = "" if epochs in (None, _spec(name).epochs) else f"-{epochs}ep"
    return zoo_dir() / f"{name}-seed{seed}{suffix}.safetensors"


@torch.no_grad()
def accuracy(model: nn.Module, device: str = "cpu", batch_size: int = 500) -> float:
    """Top-1 accuracy (a fraction) on the 10k test images."""
    images, labels = load_split("test")
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start:start + batch_size].to(device))
        correct += (logits.argmax(1).cpu() == labels[start:start + batch_size]).sum().item()
    model.train(was_training)
    return correct / len(images)


def _batches(images: torch.Tensor, labels: torch.Tensor, spec: Spec, generator: torch.Generator):
    """One epoch of shuffled (and, if the spec asks, randomly flipped) batches, all drawn from ``generator``."""
    order = torch.randperm(len(images), generator=generator)
    for start in range(0, len(order), spec.batch_size):
        index = order[start:start + spec.batch_size]
        batch = images[index]
        if spec.flip:
            flip = torch.rand(len(index), generator=generator) < 0.5
            batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        yield batch, labels[index]


def train(name: str, seed: int = 0, progress: bool = True, epochs: int | None = None) -> Path:
    """Train zoo model ``name`` from ``seed`` on the CPU and cache it; the same seed gives the same weights
    on one machine (a CPU of another family rounds differently: fashion-cnn reached 92.59% on one, 92.73% on another).

    ``epochs`` overrides the spec's (a short run checks determinism); such a run is saved under its own
    name (``checkpoint_path``), so it never replaces the zoo model.
    """
    from tqdm import tqdm

    spec = _spec(name)
    epochs = epochs or spec.epochs
    images, labels = load_split("train")
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        model = spec.build()
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
        steps = epochs * math.ceil(len(images) / spec.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=spec.lr, total_steps=steps, pct_start=0.2)
        started = time.perf_counter()
        model.train()
        for epoch in range(epochs):
            bar = tqdm(_batches(images, labels, spec, generator), total=steps // epochs, disable=not progress,
                       desc=f"{name} epoch {epoch + 1}/{epochs}", leave=False)
            for batch, target in bar:
                loss = F.cross_entropy(model(batch), target, label_smoothing=spec.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        seconds = time.perf_counter() - started
    finally:
        torch.use_deterministic_algorithms(deterministic)
    model.eval()
    info = {"name": name, "seed": seed, "epochs": epochs, "test_accuracy": accuracy(model),
            "seconds": round(seconds, 1), "torch": torch.__version__}
    path = checkpoint_path(name, seed, epochs)
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    write_tensors(path, state, {"info": json.dumps(info)})
    write_atomically(path.with_suffix(".json"), lambda temp: Path(temp).write_text(json.dumps(info, indent=2) + "\n"))
    return path


def load_zoo_model(name: str, seed: int = 0, train_if_missing: bool = True) -> nn.Module:
    """The cached trained model in eval mode, trained first (minutes on a CPU) if not cached yet."""
    spec = _spec(name)
    path = checkpoint_path(name, seed)
    if not path.is_file():
        if not train_if_missing:
            raise VQCError(f"{name} (seed {seed}) is not trained yet: run vqc zoo train {name}")
        train(name, seed)
    model = spec.build()
    try:
        model.load_state_dict(load_file(path))
    except (SafetensorError, RuntimeError, OSError) as error:
        raise VQCError(f"the cached checkpoint {path} is corrupt ({str(error).splitlines()[0]}): "
                       f"delete it or retrain with vqc zoo train {name} --seed {seed}") from None
    return model.eval()
