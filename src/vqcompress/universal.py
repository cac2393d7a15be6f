"""The universal codebook (VQ4ALL): one k × d table, extracted once from many networks, that
every coded layer of every network can point at instead of carrying its own.

Extraction: each source layer is normalised (every row divided by its RMS, the scale the
``vq4all`` method stores), the same number of sub-vectors is drawn from every layer of every
source network (large layers do not dominate), a Gaussian kernel density estimate is fitted to
them (bandwidth by Scott's or Silverman's rule), and the k codewords are placed on that density:
``placement="lloyd"`` puts them at the centroids of the density's Lloyd (k-means) cells, fitted on
draws from it, which is the least-squares quantizer of the smoothed density; ``"sample"`` draws
them from it directly (a data point plus kernel noise).

The file (``.vqcb``) is safetensors with one fp16 ``codewords`` tensor and a JSON description
(checked against ``schema.CODEBOOK``; from version 2 on with the sha256 of itself and the
codewords, checked on load); the file's sha256 is its identity. A coded weight refers to it by that hash
(``CodeLayout.codebook_sha256``) and a model file never copies it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from scipy.stats import gaussian_kde
from torch import Tensor, nn

from . import lattice, schema, trellis
from .atomic import write_atomically, write_tensors
from .cache import cache_dir
from .codebook import kmeans
from .errors import VQCError

FORMAT = "vqcb"
FORMAT_VERSION = 2  # 2: the description carries ``CONTENT_HASH``
READABLE_VERSIONS = (1, 2)
RULE_VERSION = 1  # a rule-made codebook's file keeps version 1's bytes: its hash is its name on every machine
CONTENT_HASH = "content_sha256"  # of the rest of the description and the codewords (``content_sha256``)
KEY = "vqcompress-codebook"
SUFFIX = ".vqcb"
BANDWIDTHS = ("scott", "silverman")
PLACEMENTS = ("lloyd", "sample")
DRAWS_PER_CODEWORD = 64  # density draws the Lloyd placement fits on, per codeword


@dataclass(frozen=True)
class UniversalCodebook:
    codewords: Tensor  # (k, d) fp16
    info: dict = field(default_factory=dict)  # sources, layers, samples, bandwidth, placement, seed
    sha256: str = ""

    @property
    def k(self) -> int:
        return self.codewords.shape[0]

    @property
    def dim(self) -> int:
        return self.codewords.shape[1]

    @property
    def trellis(self) -> int:
        """New bits per weight when the codebook is a trellis's state table (``trellis.py``), else 0."""
        return int(self.info.get("trellis", 0))

    @property
    def code_bits_per_weight(self) -> float:
        """What a weight's code costs: log2(k) / d, or a trellis's new bits."""
        return self.trellis or np.log2(self.k) / self.dim

    def describe(self) -> str:
        form = f", a trellis of {self.trellis} bits per weight" if self.trellis else ""
        return f"universal codebook {self.sha256[:12]}… (k = {self.k}, d = {self.dim}{form})"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def row_normalised(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(rows × cols weight over its row RMS, the fp16-rounded RMS): the units codewords are in."""
    matrix = weight.detach().reshape(weight.shape[0], -1).float()
    rms = matrix.square().mean(1, keepdim=True).sqrt().half().float().clamp_min(2**-24)
    return matrix / rms, rms


def source_layers(model: nn.Module, dim: int) -> tuple[list[tuple[str, Tensor]], list[str]]:
    """The weights a codebook is built from: every layer the default plan codes whose inputs ``dim``
    divides (a weight tied to two layers once); and the names of those it does not divide (skipped)."""
    from .plan import Plan

    used, skipped, seen = [], [], set()
    for name, module, _ in Plan().resolve(model, {}):
        if id(module.weight) in seen:  # a tied output layer is its word embedding: sampled once
            continue
        seen.add(id(module.weight))
        weight = module.weight.detach()
        (used.append((name, weight)) if weight[0].numel() % dim == 0 else skipped.append(name))
    return used, skipped


def sample_subvectors(weights: list[Tensor], dim: int, per_layer: int, generator: torch.Generator) -> Tensor:
    """``per_layer`` normalised sub-vectors from each weight (drawn with replacement, so every layer
    gives the same count whatever its size)."""
    samples = []
    for weight in weights:
        points = row_normalised(weight)[0].reshape(-1, dim)
        samples.append(points[torch.randint(len(points), (per_layer,), generator=generator)])
    return torch.cat(samples)


def extract(samples: Tensor, k: int, bandwidth: str = "scott", placement: str = "lloyd", seed: int = 0) -> Tensor:
    """k codewords on the kernel density estimate of ``samples`` ((n, d) float), fp16."""
    if bandwidth not in BANDWIDTHS or placement not in PLACEMENTS:
        raise VQCError(f"bandwidth must be one of {BANDWIDTHS} and placement one of {PLACEMENTS}")
    density = gaussian_kde(samples.double().numpy().T, bw_method=bandwidth)
    rng = np.random.default_rng(seed)
    if placement == "sample":
        codewords = density.resample(k, seed=rng).T
    else:
        draws = density.resample(DRAWS_PER_CODEWORD * k, seed=rng).T.astype(np.float32)
        codewords = kmeans(draws, k, seed, iterations=25, max_points_per_centroid=DRAWS_PER_CODEWORD)
    return torch.from_numpy(np.ascontiguousarray(codewords, dtype=np.float32)).half()


def build(models: dict[str, nn.Module], dim: int, k: int, per_layer: int = 4096, bandwidth: str = "scott",
          placement: str = "lloyd", seed: int = 0) -> UniversalCodebook:
    """Extract a universal codebook from named source ``models`` (see the module docstring)."""
    return build_from_layers({name: source_layers(model, dim) for name, model in models.items()}, dim, k, per_layer,
                             bandwidth, placement, seed)


def build_from_layers(layers: dict[str, tuple[list[tuple[str, Tensor]], list[str]]], dim: int, k: int,
                      per_layer: int = 4096, bandwidth: str = "scott", placement: str = "lloyd",
                      seed: int = 0) -> UniversalCodebook:
    """``build`` from each source model's ``source_layers`` (so that several codebooks can be built
    from models loaded once)."""
    if dim < 1 or not 2 <= k <= 1 << 16 or per_layer < 1:
        raise VQCError(f"a universal codebook needs d ≥ 1, 2 ≤ k ≤ 65536 and ≥ 1 sample per layer; got d = {dim}, "
                       f"k = {k}, {per_layer} samples")
    weights = [weight for used, _ in layers.values() for _, weight in used]
    if len(weights) * per_layer < k:
        raise VQCError(f"{len(weights)} source layers × {per_layer} samples cannot place {k} codewords")
    samples = sample_subvectors(weights, dim, per_layer, torch.Generator().manual_seed(seed))
    codewords = extract(samples, k, bandwidth, placement, seed)
    sources = [{"model": name, "layers": len(used), "skipped": skipped} for name, (used, skipped) in layers.items()]
    info = {"format": FORMAT, "format_version": FORMAT_VERSION, "dim": dim, "k": k, "sources": sources,
            "samples_per_layer": per_layer, "bandwidth": bandwidth, "placement": placement, "seed": seed,
            "normalisation": "row-rms"}
    return UniversalCodebook(codewords, info)


def content_sha256(info: dict, codewords: Tensor) -> str:
    """The sha256 of a description (without this hash) and of the codewords' bytes: version 2 on,
    checked before the codebook is used, so that a file damaged on its way is refused, not used."""
    described = json.dumps({k: v for k, v in info.items() if k != CONTENT_HASH}, sort_keys=True).encode()
    return hashlib.sha256(described + codewords.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def save_codebook(codebook: UniversalCodebook, path: str | os.PathLike) -> UniversalCodebook:
    """Write the file atomically; returns the codebook with its identity (the file's sha256)."""
    info = codebook.info
    if info.get("format_version") == FORMAT_VERSION:
        info = {**info, CONTENT_HASH: content_sha256(info, codebook.codewords)}
    metadata = {KEY: json.dumps(info, sort_keys=True)}
    path = write_tensors(path, {"codewords": codebook.codewords.contiguous()}, metadata)
    return UniversalCodebook(codebook.codewords, codebook.info, file_sha256(path))


def load_codebook(path: str | os.PathLike) -> UniversalCodebook:
    """Read and check a .vqcb file: readable, ours, this version, codewords as described, finite."""
    path = Path(path)
    if not path.is_file():
        raise VQCError(f"no such codebook file: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(KEY)
            codewords = handle.get_tensor("codewords") if "codewords" in handle.keys() else None
    except (SafetensorError, OSError, ValueError) as error:
        raise VQCError(f"{path} is not a readable codebook file (truncated or corrupt?): {error}") from None
    if raw is None or codewords is None:
        raise VQCError(f"{path} is not a vqcompress codebook file")
    try:
        info = json.loads(raw)
    except json.JSONDecodeError:
        raise VQCError(f"{path} has a corrupt description") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or info.get("format_version") not in READABLE_VERSIONS:
        shown = info if not isinstance(info, dict) else f"{info.get('format')!r} version {info.get('format_version')!r}"
        raise VQCError(f"{path} is codebook format {shown}; this vqcompress reads {FORMAT!r} versions "
                       f"{', '.join(map(str, READABLE_VERSIONS))}")
    schema.check(schema.CODEBOOK, info, f"{path} has a bad description")
    if info["format_version"] >= 2 and info.get(CONTENT_HASH) != content_sha256(info, codewords):
        raise VQCError(f"{path} is corrupt or was edited: its codewords and description do not match their sha256")
    if tuple(codewords.shape) != (info.get("k"), info.get("dim")) or codewords.dtype != torch.float16 \
            or not torch.isfinite(codewords).all():
        raise VQCError(f"{path} is corrupt: its codewords are not the finite fp16 {info.get('k')} × {info.get('dim')} "
                       "table it describes")
    return UniversalCodebook(codewords, info, file_sha256(path))


@lru_cache(maxsize=None)
def _shared_table(sha256: str, path: str) -> Tensor:
    """One (1, k, d) tensor per codebook for the whole process: every layer holds this object."""
    return load_codebook(path).codewords[None].contiguous()


_PATHS: dict[str, str] = {}  # sha256 → a file that holds it, for every codebook opened so far


def open_codebook(path: str | os.PathLike) -> UniversalCodebook:
    """Load a codebook file (or a codebook made by a rule, by its name: ``RULES``) and remember
    where it is, so its layers can find it by hash; a lattice's table is searched by its structure."""
    if str(path) in RULES:
        path = lattice_file(str(path))
    codebook = load_codebook(path)
    _PATHS[codebook.sha256] = str(Path(path).resolve())
    rule = RULES.get(codebook.info.get("lattice"))
    if rule is not None:
        if not torch.equal(codebook.codewords, rule.table().half()):
            raise VQCError(f"{path} claims to be the {codebook.info['lattice']} codebook but holds other points")
        if rule is lattice:
            lattice.STRUCTURED[codebook.sha256] = lattice.nearest
    return codebook


#: Codebooks made by a rule, not extracted (a name ``vq4all`` takes as its codebook): the module
#: that makes each (``table()``, ``DIM``, ``K``, ``UNIT``; a trellis its ``SHIFT_BITS``).
RULES = {"e8p": lattice, "trellis": trellis}


def lattice_file(name: str) -> Path:
    """The codebook file of a rule-made codebook, written to the cache on first use (the same
    bytes, so the same hash, on every machine)."""
    path = cache_dir() / "codebooks" / f"{name}{SUFFIX}"
    if not path.is_file():
        rule = RULES[name]
        info = {"format": FORMAT, "format_version": RULE_VERSION, "dim": rule.DIM, "k": rule.K,
                "lattice": name, "unit": rule.UNIT, "normalisation": "row-rms"}
        if rule is trellis:
            info["trellis"] = trellis.SHIFT_BITS
        path.parent.mkdir(parents=True, exist_ok=True)
        save_codebook(UniversalCodebook(rule.table().half(), info), path)
    return path


def table(sha256: str) -> Tensor:
    """The (1, k, d) fp16 table of an opened codebook, the same tensor object every call."""
    if sha256 not in _PATHS:
        raise VQCError(f"universal codebook {sha256[:12]}… was not opened")
    return _shared_table(sha256, _PATHS[sha256])


#: The universal codebook that ships with the package (d = 4, k = 256: built by ``vqc codebook build
#: minilm gemma-270m fashion-cnn``), which ``vq4all`` uses when none is given.
DEFAULT = Path(__file__).with_name("codebooks") / "universal-d4-k256.vqcb"


def search_path(beside: Path | None = None) -> list[Path]:
    """Folders searched for a codebook by hash: the model file's own, ``$VQC_CODEBOOKS``
    (os.pathsep-separated), ``codebooks/`` in the cache, and the package's own."""
    extra = [Path(p) for p in os.environ.get("VQC_CODEBOOKS", "").split(os.pathsep) if p]
    return [p for p in [beside, *extra, cache_dir() / "codebooks", DEFAULT.parent] if p is not None]


def find(sha256: str, folders: list[Path]) -> UniversalCodebook:
    """The codebook whose file hash is ``sha256``: already opened, or a .vqcb in one of ``folders``."""
    if sha256 in _PATHS and Path(_PATHS[sha256]).is_file() and file_sha256(Path(_PATHS[sha256])) == sha256:
        return load_codebook(_PATHS[sha256])
    for folder in folders:
        for candidate in sorted(Path(folder).glob(f"*{SUFFIX}")) if Path(folder).is_dir() else []:
            if file_sha256(candidate) == sha256:
                return open_codebook(candidate)
    for name in RULES:  # made by a rule: written to the cache if this machine has not yet
        if file_sha256(lattice_file(name)) == sha256:
            return open_codebook(name)
    raise VQCError(f"this model needs the universal codebook with sha256 {sha256}, which is in none of "
                   f"{', '.join(map(str, folders))}: put its .vqcb file beside the model or in $VQC_CODEBOOKS")


def plot(codebook: UniversalCodebook, path: str | os.PathLike, over: Tensor | None = None) -> Path:
    """PNG: the codewords projected on their two principal axes, over the density of ``over``
    (normalised sub-vectors of a model, same projection) when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    words = codebook.codewords.float()
    centre = words.mean(0)
    axes = torch.linalg.svd(words - centre, full_matrices=False).Vh[:2].T if codebook.dim > 1 else None
    project = (lambda x: (x - centre) @ axes) if axes is not None else (lambda x: torch.cat([x, torch.zeros_like(x)], 1))
    figure, axis = plt.subplots(figsize=(6, 5))
    if over is not None:
        points = project(over.float())
        hexes = axis.hexbin(points[:, 0], points[:, 1], gridsize=80, bins="log", cmap="Greys")
        figure.colorbar(hexes, label="model sub-vectors (log count)")
    shown = project(words)
    axis.scatter(shown[:, 0], shown[:, 1], s=6, c="tab:red", label=f"{codebook.k} codewords")
    axis.set(title=codebook.describe(), xlabel="principal axis 1", ylabel="principal axis 2")
    axis.legend(loc="upper right")
    result = write_atomically(path, lambda temp: figure.savefig(temp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(figure)
    return result
