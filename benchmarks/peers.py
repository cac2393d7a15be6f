"""Peer compressors (coremltools palettization: post-training, sensitivity-weighted SKM and DKM; HQQ)
applied in place to a torch model.

Benchmarks compare vqcompress with these tools at matched bits per weight, so each
wrapper measures what the peer really stores (indices, LUTs, scales, zeros) from the
objects it leaves in the model, instead of trusting the nominal bit width.
"""

import copy
import math
import re
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def lut_layout(model: nn.Module, layer_names: list[str] | None, group_size: int | None) -> tuple[list[str], str]:
    """The layers a coremltools palettizer is given (the default ones unless named) and its
    granularity: one LUT per tensor, or one per ``group_size`` output channels."""
    names = layer_names if layer_names is not None else default_layers(model, (nn.Linear, nn.Embedding))
    return names, "per_tensor" if group_size is None else "per_grouped_channel"


def palettized_result(model: nn.Module, names: list[str], seconds: float, settings: dict) -> PeerResult:
    """A coremltools palettizer's result: the bits of the layers it really palettized (detected
    from their LUTs), the rest of ``names`` listed as skipped."""
    done, bits, n_weights = palettized(model, names)
    settings = {**settings, "lut_entry_bits": LUT_ENTRY_BITS, "layers": done, "skipped": [n for n in names if n not in done]}
    return PeerResult(model, bits / n_weights, bits, n_weights, seconds, settings)


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

    names, granularity = lut_layout(model, layer_names, group_size)
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

    return palettized_result(model, names, seconds, {"peer": "coremltools-ptp", "n_bits": n_bits, "cluster_dim": cluster_dim,
                                                     "granularity": granularity, "group_size": group_size})


def output_fisher_loss(forward: Callable[[nn.Module, Any], torch.Tensor], seed: int = 0
                       ) -> Callable[[nn.Module, Any], torch.Tensor]:
    """A loss for SKM's sensitivities: squared error of the outputs to themselves plus Gaussian noise.

    SKM weighs each weight by the sum over calibration samples of its squared loss gradient
    (a diagonal Fisher). A distillation loss to the fp32 model's own output, taken at the fp32
    weights, is zero with a zero gradient, so every sensitivity would tie and SKM would fall back to
    plain k-means. Instead the target is the model's output plus unit Gaussian noise ε (masked at
    padding when the sample has an ``attention_mask``): the gradient is -Jᵀε, whose square has
    expectation diag(JᵀJ), the Gauss-Newton diagonal, which is the Hessian of the squared-error
    distillation loss at the fp32 weights (the Fisher of a Gaussian output model). The noise is
    drawn from a generator seeded once, so a run is repeatable.
    """
    generator = torch.Generator().manual_seed(seed)

    def loss_fn(model: nn.Module, sample: Any) -> torch.Tensor:
        output = forward(model, sample)
        noise = torch.randn(output.shape, generator=generator, dtype=output.dtype)
        if isinstance(sample, dict) and "attention_mask" in sample:
            mask = sample["attention_mask"].to(output.dtype)
            noise = noise * mask.reshape(*mask.shape, *(1,) * (output.dim() - mask.dim()))
        return 0.5 * (output - (output.detach() + noise)).pow(2).sum()

    return loss_fn


def sentence_samples(batches: Iterable[dict]) -> list[dict]:
    """Tokenizer batches split into one-sentence samples, padding dropped.

    SKM squares the gradient of each sample it is given, so one sentence a sample sums the
    squares of per-sentence gradients (an empirical Fisher) instead of squaring batch sums.
    """
    samples = []
    for batch in batches:
        for row in range(batch["attention_mask"].shape[0]):
            length = int(batch["attention_mask"][row].nonzero().max()) + 1
            samples.append({k: v[row:row + 1, :length] for k, v in batch.items()})
    return samples


def skm_palettize(
    model: nn.Module,
    n_bits: int,
    samples: list,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    cluster_dim: int = 1,
    group_size: int | None = None,
    layer_names: list[str] | None = None,
) -> PeerResult:
    """Palettize Linear and Embedding weights with coremltools' SKMPalettizer (SqueezeLLM's
    sensitivity-weighted k-means): weights with a larger squared gradient of ``loss_fn`` over
    ``samples`` pull the centroids harder.

    Layers, LUT layout (one fp16 LUT per tensor, or one per ``group_size`` output channels) and
    the bit count are those of :func:`coreml_palettize`; the per-channel scales SKM can add
    (``enable_per_channel_scale``) are left off, so nothing beyond LUT and indices is stored.
    """
    from coremltools.optimize.torch.palettization import (
        ModuleSKMPalettizerConfig,
        SKMPalettizer,
        SKMPalettizerConfig,
    )

    names, granularity = lut_layout(model, layer_names, group_size)
    layer_config = ModuleSKMPalettizerConfig(
        n_bits=n_bits, granularity=granularity, group_size=group_size, cluster_dim=cluster_dim
    )
    config = SKMPalettizerConfig(
        module_name_configs={re.escape(n): layer_config for n in names}, calibration_nsamples=len(samples)
    )
    # SKM reads .grad of every parameter that requires one, so only the weights it palettizes do
    # (an unused one, such as a pooler's, would have none); the flags are put back afterwards.
    trainable = {p: p.requires_grad for p in model.parameters()}
    model.eval().requires_grad_(False)
    for name in names:
        model.get_submodule(name).weight.requires_grad_(True)
    weights = [model.get_submodule(n).weight for n in names]

    def loss_reaching_every_weight(module: nn.Module, sample: Any) -> torch.Tensor:
        # A weight the loss does not reach (MiniLM's pooler, when the loss reads the token states)
        # would have no .grad, which SKM cannot take; a zero term gives it zero gradients, hence
        # all-equal sensitivities: plain k-means for that layer, reported as "unweighted".
        return loss_fn(module, sample) + 0 * sum(w.reshape(-1)[0] for w in weights)

    torch.manual_seed(0)
    np.random.seed(0)
    start = time.perf_counter()
    palettizer = SKMPalettizer(model, config)
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "sensitivity.pt")
        sensitivity = palettizer.compute_sensitivity(samples, loss_reaching_every_weight, sensitivity_path=path)
        palettizer.compress(sensitivity_path=path, inplace=True)
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    for parameter, flag in trainable.items():
        parameter.requires_grad_(flag)
    unweighted = [n for n in names if bool((sensitivity[f"{n}.weight"] == 1).all())]

    return palettized_result(model, names, seconds, {"peer": "coremltools-skm", "n_bits": n_bits, "cluster_dim": cluster_dim,
                                                     "granularity": granularity, "group_size": group_size,
                                                     "calibration_samples": len(samples), "unweighted": unweighted})


def skm_palettize_calibrated(
    model: nn.Module, n_bits: int, cluster_dim: int = 1, group_size: int | None = None
) -> PeerResult:
    """:func:`skm_palettize` on the calibration data vqcompress uses for this model.

    For an encoder (MiniLM) that is the first ``calibration_batches`` batches of Lee background
    sentences (128 sentences), fed one sentence a sample; the loss is :func:`output_fisher_loss`
    on the task's forward (the last hidden state).
    """
    from vqcompress.data import training_data
    from vqcompress.source import source_of

    data = training_data(source_of(model).to_json())
    batches = [data.batch_at(i) for i in range(data.calibration_batches)]
    samples = sentence_samples(batches) if isinstance(batches[0], dict) else batches
    result = skm_palettize(model, n_bits, samples, output_fisher_loss(data.task.forward), cluster_dim, group_size)
    result.settings["loss"] = "output_fisher"
    return result


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
