"""How fast a coded model runs against its dense twin: per layer, whole model, tokens per second,
and the memory its weights hold.

The dense twin is the same model with every coded layer decoded back to a plain fp32 layer
(``densify``, tied weights tied again), so both sides run the same architecture and the only
difference is how each weight is held. The coded side runs the path its layers have (by default
"auto": the compiled kernel where ``kernels.backend()`` says it is there). Every time is the median of ``repeats`` calls after
two warm-up calls, dense and coded measured in the same process one after the other.
"""

from __future__ import annotations

import copy
import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from . import kernels
from .errors import VQCError
from .inputs import tokenizer_folder
from .layers import CodedConv1d, CodedConv2d, CodedEmbedding, CodedTensor, densify, iter_coded
from .source import source_of

WARMUP = 2
CONV_SIZE = 16  # a convolution's input length (1-d) or side (2-d) when timing it alone
PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"


def median_ms(call: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``call`` in milliseconds, after ``WARMUP`` untimed calls."""
    times = []
    with torch.no_grad():
        for i in range(WARMUP + repeats):
            start = time.perf_counter()
            call()
            if i >= WARMUP:
                times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def layer_input(layer: nn.Module, batch: int) -> Tensor:
    """A random input of the layer's shape: ``batch`` vectors for a Linear, ``batch`` signals of
    ``CONV_SIZE`` (squared for 2-d) positions for a convolution."""
    generator = torch.Generator().manual_seed(0)
    if isinstance(layer, CodedConv2d):
        return torch.randn(batch, layer.in_channels, CONV_SIZE, CONV_SIZE, generator=generator)
    if isinstance(layer, CodedConv1d):
        return torch.randn(batch, layer.in_channels, CONV_SIZE, generator=generator)
    return torch.randn(batch, layer.in_features, generator=generator)


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds, each storage counted once (tied and
    shared tensors are one)."""
    storages = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def process_memory_mib() -> dict[str, float]:
    """The process's resident set now (Linux) and its peak, in MiB."""
    current = None
    try:
        with open("/proc/self/statm") as statm:
            current = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        pass
    return {"rss_mib": current, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def dense_twin(model: nn.Module) -> nn.Module:
    """The model with every coded layer decoded to its plain fp32 layer; tied weights tied again."""
    dense = densify(copy.deepcopy(model))
    if hasattr(dense, "tie_weights"):
        dense.tie_weights()
    return dense


@dataclass
class LayerSpeed:
    name: str
    kind: str
    shape: tuple[int, ...]
    k: int
    dim: int
    batch: int
    dense_ms: float
    coded_ms: float

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.coded_ms

    def to_json(self) -> dict:
        return asdict(self) | {"speedup": self.speedup}


@dataclass
class SpeedReport:
    backend: str
    threads: int
    repeats: int
    layers: list[LayerSpeed] = field(default_factory=list)
    model: dict = field(default_factory=dict)  # whole-model latency, when the model's input is known
    generation: dict = field(default_factory=dict)  # tokens per second, for causal LMs
    memory: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self) | {"layers": [layer.to_json() for layer in self.layers]}

    def __str__(self) -> str:
        header = f"{'layer':<44} {'shape':>16} {'k':>6} {'d':>2} {'batch':>5} {'dense ms':>9} {'coded ms':>9} speedup"
        lines = [f"kernel: {self.backend}; {self.threads} threads; median of {self.repeats} repeats", "", header]
        for r in self.layers:
            shape = "×".join(map(str, r.shape))
            lines.append(f"{r.name[-44:]:<44} {shape:>16} {r.k:>6} {r.dim:>2} {r.batch:>5} {r.dense_ms:>9.3f} "
                         f"{r.coded_ms:>9.3f} {r.speedup:>6.2f}×")
        if self.model:
            m = self.model
            lines += ["", f"whole model, {m['input']}: dense {m['dense_ms']:.2f} ms, coded {m['coded_ms']:.2f} ms "
                          f"({m['dense_ms'] / m['coded_ms']:.2f}×)"]
        if self.generation:
            g = self.generation
            dense, coded = g["dense_tokens_per_s"], g["coded_tokens_per_s"]
            lines += [f"generation, {g['new_tokens']} new tokens after a {g['prompt_tokens']}-token prompt, greedy, "
                      f"batch 1, KV cache: dense {dense:.1f} tokens/s, coded {coded:.1f} tokens/s ({coded / dense:.2f}×)"]
        mem = self.memory
        dense, coded = mem["dense_weight_bytes"] / 2**20, mem["coded_weight_bytes"] / 2**20
        rss = "?" if mem["rss_mib"] is None else f"{mem['rss_mib']:,.0f}"
        lines += ["", f"resident weights: dense {dense:,.1f} MiB, coded {coded:,.1f} MiB (1/{dense / coded:.1f}); "
                      f"process RSS {rss} MiB (peak {mem['peak_rss_mib']:,.0f} MiB, both models loaded)"]
        return "\n".join(lines)


def layer_speeds(model: nn.Module, dense: nn.Module, batches: list[int], repeats: int) -> list[LayerSpeed]:
    """Each coded matmul or convolution layer alone, against the same layer of the dense twin."""
    speeds = []
    for name, layer in iter_coded(model):
        if isinstance(layer, (CodedEmbedding, CodedTensor)):  # a lookup, or a tensor its module reads: no product
            continue
        twin, lay = dense.get_submodule(name), layer.weight_code.layout
        for batch in batches:
            x = layer_input(layer, batch)
            speeds.append(LayerSpeed(name, type(layer).__name__.removeprefix("Coded"), lay.shape, lay.k, lay.dim, batch,
                                     median_ms(lambda: twin(x), repeats), median_ms(lambda: layer(x), repeats)))
    return speeds


def model_input(model: nn.Module) -> tuple[str, Tensor] | None:
    """A batch-1 input for the whole model when its kind is known: a short prompt's token ids for a
    transformers model, one image for a zoo model; None otherwise."""
    if source_of(model).kind == "zoo":
        return "one 28×28 image", torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    if not hasattr(getattr(model, "config", None), "vocab_size"):
        return None
    ids = prompt_ids(model)
    return f"a {ids.shape[1]}-token prompt", ids


def prompt_ids(model: nn.Module) -> Tensor:
    """The prompt's token ids through the model's own tokenizer where it has one, else fixed ids."""
    folder = tokenizer_folder(model)
    if folder is None:  # the speed does not depend on which ids
        return torch.arange(1, 13)[None] % model.config.vocab_size
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)(PROMPT, return_tensors="pt")["input_ids"]


def tokens_per_second(model: nn.Module, ids: Tensor, new_tokens: int, repeats: int) -> float:
    """Greedy generation of exactly ``new_tokens`` tokens with the KV cache, batch 1, prompt included
    in the time: new tokens over the median time."""
    def generate() -> None:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False)

    return new_tokens / (median_ms(generate, repeats) / 1e3)


def check_settings(repeats: int, batches: tuple[int, ...], new_tokens: int, threads: int | None) -> None:
    """Reject impossible settings before any work."""
    if not batches or min(repeats, new_tokens, *batches, 1 if threads is None else threads) < 1:
        raise VQCError("repeats, tokens, batch sizes and threads must be at least 1")


def bench_speed(model: nn.Module, repeats: int = 20, batches: tuple[int, ...] = (1,), new_tokens: int = 32,
                threads: int | None = None, generation_repeats: int = 3) -> SpeedReport:
    """Time a loaded coded model (``io.load``) against its dense twin."""
    check_settings(repeats, batches, new_tokens, threads)
    if not any(True for _ in iter_coded(model)):
        raise VQCError("the model has no coded layers: nothing to compare")
    if threads is not None:
        torch.set_num_threads(threads)
    dense = dense_twin(model).eval()
    report = SpeedReport(kernels.backend(), torch.get_num_threads(), repeats,
                         layer_speeds(model, dense, list(batches), repeats))
    example = model_input(model)
    if example is not None:
        what, x = example
        report.model = {"input": what, "dense_ms": median_ms(lambda: dense(x), repeats),
                        "coded_ms": median_ms(lambda: model(x), repeats)}
        if is_causal_lm(model):
            report.generation = {
                "prompt_tokens": x.shape[1], "new_tokens": new_tokens, "repeats": generation_repeats,
                "dense_tokens_per_s": tokens_per_second(dense, x, new_tokens, generation_repeats),
                "coded_tokens_per_s": tokens_per_second(model, x, new_tokens, generation_repeats)}
    report.memory = {"dense_weight_bytes": resident_bytes(dense), "coded_weight_bytes": resident_bytes(model),
                     **process_memory_mib()}
    return report


def is_causal_lm(model: nn.Module) -> bool:
    """Whether the model generates text (a transformers ``…ForCausalLM``)."""
    return type(model).__name__.endswith("ForCausalLM")
