"""Peer compressors (coremltools palettization, post-training and DKM; HQQ) applied in place to a torch model.

Benchmarks compare vqcompress with these tools at matched bits per weight, so each
wrapper measures what the peer really stores (indices, LUTs, scales, zeros) from the
objects it leaves in the model, instead of trusting the nominal bit width.
"""

import copy
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

MIN_WEIGHTS = 4096  # smaller layers (tiny heads, token-type embeddings) stay dense by default
LUT_BUFFER = "_COREML_/weight/lut"  # where coremltools registers a palettized weight's LUT
LUT_ENTRY_BITS = 16  # Core ML stores LUT entries in fp16


@dataclass
class PeerResult:
    """A peer-compressed model and what it costs; bits count only the layers compressed."""

    model: nn.Module
    bits_per_weight: float
    compressed_bits: int
    n_weights: int
    seconds: float
    settings: dict


def default_layers(model: nn.Module, types: tuple[type, ...]) -> list[str]:
    """Names of the layers of `types` big enough to be worth compressing."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, types) and module.weight.numel() >= MIN_WEIGHTS
    ]


def tensor_bits(tensor: torch.Tensor) -> int:
    """Bits a tensor occupies as stored, whatever its dtype."""
    return tensor.numel() * tensor.element_size() * 8


def coreml_layer_bits(module: nn.Module) -> int:
    """Stored bits of one palettized layer, read from the LUT coremltools registered.

    The LUT has shape (..., entries, cluster_dim): entries fix the index width and
    cluster_dim how many weights one index covers.
    """
    lut = module.get_buffer(LUT_BUFFER)
    entries, cluster_dim = lut.shape[-2], lut.shape[-1]
    index_bits = math.ceil(math.log2(entries))
    return module.weight.numel() // cluster_dim * index_bits + lut.numel() * LUT_ENTRY_BITS


def palettized(model: nn.Module, names: list[str]) -> tuple[list[str], int, int]:
    """The layers coremltools really palettized (it skips some silently), their stored bits and weights."""
    modules = {n: model.get_submodule(n) for n in names}
    done = [n for n, m in modules.items() if LUT_BUFFER in dict(m.named_buffers())]
    if not done:
        raise ValueError(f"coremltools palettized none of {names}; see its warnings for why")
    return done, sum(coreml_layer_bits(modules[n]) for n in done), sum(modules[n].weight.numel() for n in done)


def coreml_palettize(
    model: nn.Module,
    n_bits: int,
    cluster_dim: int = 1,
    group_size: int | None = None,
    layer_names: list[str] | None = None,
) -> PeerResult:
    """Palettize Linear and Embedding weights with coremltools' data-free k-means.

    group_size=None gives one LUT per tensor; otherwise one LUT per `group_size`
    output channels (rows). coremltools silently skips a layer whose rows are not
    divisible by group_size (or by cluster_dim), so the layers actually compressed are
    detected from the LUT buffers and only they are counted.
    """
    from coremltools.optimize.torch.palettization import (
        ModulePostTrainingPalettizerConfig,
        PostTrainingPalettizer,
        PostTrainingPalettizerConfig,
    )

    names = layer_names if layer_names is not None else default_layers(model, (nn.Linear, nn.Embedding))
    granularity = "per_tensor" if group_size is None else "per_grouped_channel"
    layer_config = ModulePostTrainingPalettizerConfig(
        n_bits=n_bits, granularity=granularity, group_size=group_size, cluster_dim=cluster_dim
    )
    # Names are regexes to coremltools; escaping keeps "layer.1" from matching "layer11".
    config = PostTrainingPalettizerConfig(module_name_configs={re.escape(n): layer_config for n in names})
    torch.manual_seed(0)  # vector k-means (cluster_dim > 1) starts from a random k-means++ draw
    np.random.seed(0)
    start = time.perf_counter()
    PostTrainingPalettizer(model, config).compress(inplace=True)
    seconds = time.perf_counter() - start

    done, bits, n_weights = palettized(model, names)
    settings = {
        "peer": "coremltools-ptp",
        "n_bits": n_bits,
        "cluster_dim": cluster_dim,
        "granularity": granularity,
        "group_size": group_size,
        "lut_entry_bits": LUT_ENTRY_BITS,
        "layers": done,
        "skipped": [n for n in names if n not in done],
    }
    return PeerResult(model, bits / n_weights, bits, n_weights, seconds, settings)


def hqq_layer_bits(layer: nn.Module) -> int:
    """Stored bits of one HQQLinear: packed W_q plus every tensor in its meta (scale, zero)."""
    meta_bits = sum(tensor_bits(t) for t in layer.meta.values() if torch.is_tensor(t))
    return tensor_bits(layer.W_q) + meta_bits


def hqq_quantize(
    model: nn.Module, nbits: int, group_size: int = 64, layer_names: list[str] | None = None
) -> PeerResult:
    """Replace Linear layers by HQQ's data-free affine quantization (HQQ handles Linear only).

    Scales and zeros are kept in the compute dtype, fp32 here so the model runs on CPU;
    they are counted at that width because that is what HQQ holds.
    """
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    names = layer_names if layer_names is not None else default_layers(model, (nn.Linear,))
    if not names:
        raise ValueError("no Linear layer to quantize")
    config = BaseQuantizeConfig(nbits=nbits, group_size=group_size)
    start = time.perf_counter()
    layers = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        layers[name] = HQQLinear(
            model.get_submodule(name), config, compute_dtype=torch.float32, device="cpu"
        )
        setattr(model.get_submodule(parent_name), child, layers[name])
    seconds = time.perf_counter() - start

    bits = sum(hqq_layer_bits(layer) for layer in layers.values())
    n_weights = sum(layer.in_features * layer.out_features for layer in layers.values())
    settings = {
        "peer": "hqq",
        "nbits": nbits,
        "group_size": group_size,
        "axis": config["weight_quant_params"]["axis"],
        "meta_dtype": str(layers[names[0]].meta["scale"].dtype),
        "layers": names,
    }
    return PeerResult(model, bits / n_weights, bits, n_weights, seconds, settings)


def dkm_palettize(
    model: nn.Module,
    n_bits: int,
    steps: int,
    batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    lr: float = 1e-3,
    cluster_dim: int = 1,
    layer_names: list[str] | None = None,
    overrides: dict[str, tuple[int, int]] | None = None,
) -> PeerResult:
    """Palettize Linear and Conv2d weights with coremltools' DKM, learned in a short training run.

    DKM is training-time: the model trains for ``steps`` Adam steps on ``batches(step)``
    (images, labels) with the loss our fine-tuning uses (distillation from a frozen copy of
    the model plus cross-entropy), the learning rate decaying to zero by cosine. One LUT per
    tensor (per_tensor), kept in fp16 (lut_dtype="f16") and counted at that width.
    ``overrides`` gives chosen layers their own (n_bits, cluster_dim).
    """
    from coremltools.optimize.torch.palettization import (
        DKMPalettizer,
        DKMPalettizerConfig,
        ModuleDKMPalettizerConfig,
    )
    from vqcompress.finetune import classification_task

    names = layer_names if layer_names is not None else default_layers(model, (nn.Linear, nn.Conv2d))
    settings = {n: (overrides or {}).get(n, (n_bits, cluster_dim)) for n in names}
    config = DKMPalettizerConfig(module_name_configs={
        re.escape(n): ModuleDKMPalettizerConfig(n_bits=b, cluster_dim=c, weight_threshold=0, lut_dtype="f16")
        for n, (b, c) in settings.items()})
    teacher = copy.deepcopy(model).eval()
    loss_of = classification_task().loss
    torch.manual_seed(0)
    start = time.perf_counter()
    palettizer = DKMPalettizer(model, config)
    model = palettizer.prepare(inplace=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for step in range(steps):
        batch = batches(step)
        with torch.no_grad():
            target = teacher(batch[0])
        loss = loss_of(model(batch[0]), target, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        palettizer.step()
    model = palettizer.finalize(inplace=True).eval()
    seconds = time.perf_counter() - start

    done, bits, n_weights = palettized(model, names)
    settings = {"peer": "coremltools-dkm", "n_bits": n_bits, "cluster_dim": cluster_dim, "granularity": "per_tensor",
                "steps": steps, "lr": lr, "lut_entry_bits": LUT_ENTRY_BITS, "layers": done,
                "skipped": [n for n in names if n not in done]}
    return PeerResult(model, bits / n_weights, bits, n_weights, seconds, settings)
