"""Honest accounting: bits per weight from the bytes that are (or would be) written.

Every tensor counts: a coded layer costs all of its buffers (packed codes, codebooks, scales,
offsets, permutation); everything else is listed as left uncompressed with its own bytes.
The whole-model figure divides all those bits by every parameter the model represents.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from .coded import CodeLayout
from .io import DTYPE_BYTES, file_bytes, manifest_of, model_tensors, read_manifest, shapes_of

CODE_PART = ".weight_code."
DTYPE_BITS = {dtype: 8 * size for dtype, size in DTYPE_BYTES.items()}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


@dataclass
class CodedRow:
    name: str
    method: str
    shape: tuple[int, ...]
    k: int
    dim: int
    weights: int
    bits: int
    form: str = "index"  # or the factor form's settings (``CodeLayout.describe_form``)

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.weights


@dataclass
class DenseRow:
    name: str
    shape: tuple[int, ...]
    dtype: str
    bits: int


@dataclass
class Report:
    coded: list[CodedRow]
    dense: list[DenseRow]
    parameters: int  # every weight the model represents, coded or dense
    file_bytes: int  # the whole file, written or as it would be written (``io.file_bytes``)
    aliases: dict[str, str] = field(default_factory=dict)
    universal: dict[str, int] = field(default_factory=dict)  # sha256 → bits of each universal codebook used

    def bits_per_weight_sharing(self, models: int) -> float:
        """Whole-model bits per weight with the universal codebooks' bits shared by ``models`` models."""
        return (self.file_bits + sum(self.universal.values()) / models) / max(1, self.parameters)

    @property
    def coded_bits(self) -> int:
        return sum(r.bits for r in self.coded)

    @property
    def coded_weights(self) -> int:
        return sum(r.weights for r in self.coded)

    @property
    def total_bits(self) -> int:
        return self.coded_bits + sum(r.bits for r in self.dense)

    @property
    def file_bits(self) -> int:
        return 8 * self.file_bytes

    @property
    def header_bytes(self) -> int:
        """The file's bytes that are no tensor: safetensors' tensor table and the manifest."""
        return self.file_bytes - self.total_bits // 8

    @property
    def coded_bits_per_weight(self) -> float:
        return self.coded_bits / max(1, self.coded_weights)

    @property
    def model_bits_per_weight(self) -> float:
        """Every byte of the file over the original model's parameters."""
        return self.file_bits / max(1, self.parameters)

    def to_json(self) -> dict:
        return {
            "coded_layers": [asdict(r) | {"bits_per_weight": r.bits_per_weight} for r in self.coded],
            "uncompressed": [asdict(r) for r in self.dense],
            "aliases": self.aliases,
            "parameters": self.parameters, "coded_weights": self.coded_weights,
            "coded_bits_per_weight": self.coded_bits_per_weight,
            "model_bits_per_weight": self.model_bits_per_weight,
            "total_bytes": self.total_bits / 8, "file_bytes": self.file_bytes,
            "ratio_vs_fp32": 32 / self.model_bits_per_weight, "ratio_vs_fp16": 16 / self.model_bits_per_weight,
            "universal_codebooks": {sha: bits / 8 for sha, bits in self.universal.items()},
            "model_bits_per_weight_with_codebooks": self.bits_per_weight_sharing(1),
        }

    def _dense_patterns(self) -> dict[str, int]:
        """Uncompressed tensor names with layer numbers folded, so a 40-layer model lists in a screen."""
        return dict(Counter(_fold_numbers(r.name) for r in self.dense))

    def __str__(self) -> str:
        forms = any(r.form != "index" for r in self.coded)
        lines = [f"{'layer':<48} {'method':<8} {'shape':<16} {'k':>6} {'d':>3} {'bits/w':>7} {'share':>6}"
                 + ("  form" if forms else "")]
        lines += [f"{r.name:<48} {r.method:<8} {'×'.join(map(str, r.shape)):<16} {r.k:>6} {r.dim:>3} {r.bits_per_weight:>7.3f} "
                  f"{100 * r.bits / max(1, self.total_bits):>5.1f}%" + (f"  {r.form}" if forms else "") for r in self.coded]
        dense_params = self.parameters - self.coded_weights
        lines += [
            f"left uncompressed: {len(self.dense)} tensors, {dense_params:,} parameters, "
            f"{sum(r.bits for r in self.dense) / 8 / 1024:.1f} KiB (layer numbers folded into #):",
            *[f"  {pattern} ×{count}" if count > 1 else f"  {pattern}" for pattern, count in self._dense_patterns().items()],
            f"coded layers : {len(self.coded)} layers, {self.coded_weights:,} weights, {self.coded_bits_per_weight:.3f} bits/weight",
            f"whole model  : {self.parameters:,} parameters, file of {self.file_bytes:,} bytes ({self.header_bytes:,} of "
            f"them header and manifest), {self.model_bits_per_weight:.3f} bits/weight, {_times(32, self)} fp32, "
            f"{_times(16, self)} fp16",
        ]
        for sha, bits in self.universal.items():
            lines.append(f"universal    : codebook {sha[:12]}… ({bits // 8:,} bytes) stored apart and shared, not counted "
                         f"above; with it counted for this model alone: {self.bits_per_weight_sharing(1):.3f} bits/weight")
        return "\n".join(lines)


def _times(bits: int, report: Report) -> str:
    """"8.0× smaller than" or, for a model the file makes larger, "1.3× larger than"."""
    ratio = bits / report.model_bits_per_weight
    return f"{ratio:.1f}× smaller than" if ratio >= 1 else f"{1 / ratio:.1f}× larger than"


def _fold_numbers(name: str) -> str:
    return re.sub(r"\.\d+\.", ".#.", name)


def _build(manifest: dict, shapes: dict[str, tuple[str, tuple[int, ...]]], file_bytes: int | None) -> Report:
    """One accounting for files and in-memory models: tensor dtypes and shapes plus the manifest."""
    def bits(name: str) -> int:
        dtype, shape = shapes[name]
        return DTYPE_BITS[dtype] * math.prod(shape)

    coded, owned, universal = [], set(), {}
    for name, entry in manifest["layers"].items():
        parts = [t for t in shapes if t.startswith((name + CODE_PART).lstrip("."))]
        if not parts:  # every tensor an alias: a layer tied to another, counted there
            continue
        owned.update(parts)
        lay = entry["layout"]
        if lay.get("codebook_sha256"):
            universal[lay["codebook_sha256"]] = 16 * lay["k"] * lay["dim"]  # fp16 codewords
        coded.append(CodedRow(name, entry["recipe"].get("method", "?"), tuple(lay["shape"]), lay["k"], lay["dim"],
                              math.prod(lay["shape"]), sum(bits(t) for t in parts),
                              CodeLayout.from_json(lay).describe_form()))
    dense = [DenseRow(n, shapes[n][1], shapes[n][0], bits(n)) for n in sorted(shapes) if n not in owned]
    parameters = sum(r.weights for r in coded) + sum(math.prod(r.shape) for r in dense if r.dtype in FLOAT_DTYPES)
    return Report(coded, dense, parameters, file_bytes, manifest.get("aliases", {}), universal)


def report(model_or_path: nn.Module | str | os.PathLike) -> Report:
    """The bit report of a .vqc file, or of an in-memory model as it would be saved (its file's
    size computed exactly, header and manifest included)."""
    if isinstance(model_or_path, nn.Module):
        tensors, aliases = model_tensors(model_or_path)
        manifest = manifest_of(model_or_path, tensors, aliases)
        shapes = shapes_of(tensors)
        return _build(manifest, shapes, file_bytes(shapes, manifest))
    manifest, shapes = read_manifest(model_or_path)
    return _build(manifest, shapes, Path(model_or_path).stat().st_size)
