"""What each layer sees on real data: input statistics, and block-by-block inputs.

``InputStatistics`` of a layer are what an activation-aware method needs to weigh its error by
the inputs: for a Linear or a convolution the Gram matrix ``E[x xᵀ]`` of its inputs (im2col
patches for a convolution), whose diagonal is the input energy; for an Embedding how often each
row is looked up. The layer's output error ``E‖x (W − Ŵ)ᵀ‖²`` is then ``tr(E G Eᵀ)`` (``error``).

``Blocks`` runs a model's repeated blocks (transformer layers) one at a time on inputs captured
once before the first block, so that a compressor can fit block i on inputs that went through
the blocks already compressed, holding only one block's activations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .coded import row_slices


@dataclass
class InputStatistics:
    """Input statistics of one layer: ``gram`` (cols × cols) for matmul layers, ``row_weight``
    (rows) for embeddings, both means over the calibration inputs."""

    gram: Tensor | None = None
    row_weight: Tensor | None = None
    mean: Tensor | None = None  # mean input (cols): what a bias can absorb

    def centred(self) -> InputStatistics:
        """Statistics of the inputs less their mean, E[(x − μ)(x − μ)ᵀ]: the error left once the
        layer's bias absorbs the mean output error (E (W − Ŵ) μ), as ``correct_bias`` does."""
        if self.gram is None or self.mean is None:
            return self
        return InputStatistics(gram=self.gram - torch.outer(self.mean, self.mean), mean=None)

    def damped(self, fraction: float) -> InputStatistics:
        """Statistics with ``fraction`` × the mean input energy added to every input's own (a ridge):
        inputs that calibration barely excites still count, so the fit does not throw away their
        precision on the strength of a few samples."""
        if self.gram is None:
            weight = self.row_weight
            return InputStatistics(row_weight=weight + fraction * weight.mean())
        ridge = fraction * self.gram.diagonal().mean()
        return InputStatistics(gram=self.gram + ridge * torch.eye(len(self.gram), device=self.gram.device), mean=self.mean)

    def transformed(self, apply: Callable[[Tensor], Tensor]) -> InputStatistics:
        """Statistics of the inputs T x, for ``apply`` x ↦ T x a linear map along the last dimension
        (an incoherence rotation): Gram T G Tᵀ, mean T μ; row weights as they are."""
        if self.gram is None:
            return self
        gram = apply(apply(self.gram).T)
        return InputStatistics(gram=(gram + gram.T) / 2, row_weight=self.row_weight,
                               mean=None if self.mean is None else apply(self.mean))

    def heaviest_rows(self, weight: Tensor, count: int) -> Tensor:
        """The ``count`` rows of ``weight`` (rows × cols) of largest weighted energy: the rows whose
        coding error weighs most (it is about a fixed fraction of that energy), which an embedding
        keeps apart (``keep_rows``)."""
        return self.row_errors_in_slices(lambda rows: weight[rows], *weight.shape, weight.device).topk(count).indices

    def without_rows(self, rows: Tensor) -> InputStatistics:
        """These statistics with the row weights of ``rows`` at zero, for fitting a codebook to the
        rows that will use it (not to kept rows); a Gram matrix weighs inputs, not rows: unchanged."""
        if self.row_weight is None:
            return self
        weight = self.row_weight.clone()
        weight[rows.to(weight.device)] = 0
        return InputStatistics(row_weight=weight)

    def importance(self) -> Tensor:
        """Per-weight importance, broadcastable to (rows, cols): the diagonal weighting of the error."""
        if self.gram is not None:
            return self.gram.diagonal()[None, :].clamp_min(0)
        return self.row_weight[:, None]

    def error(self, difference: Tensor) -> Tensor:
        """Output error E‖x·Δᵀ‖² of a weight difference Δ (rows × cols)."""
        return self.row_errors(difference).sum()

    def row_errors(self, difference: Tensor, rows: Tensor | None = None) -> Tensor:
        """Each row's share of the output error of a weight difference Δ (rows × cols), or of Δ's
        rows being the weight's ``rows`` (a slice of a large weight)."""
        if self.gram is not None:
            return ((difference @ self.gram) * difference).sum(1)
        return (self.row_weight if rows is None else self.row_weight[rows]) * difference.square().sum(1)

    def row_errors_in_slices(self, difference: Callable[[Tensor], Tensor], rows: int, cols: int,
                             device: torch.device | str = "cpu") -> Tensor:
        """``row_errors`` of a rows × cols difference given a slice of rows at a time
        (``difference(row_numbers)``, ``coded.row_slices``): a token embedding's difference is as
        large as its weight, and never made whole."""
        slices = [torch.arange(part.start, part.stop, device=device) for part in row_slices(rows, cols)]
        return torch.cat([self.row_errors(difference(numbers), numbers) for numbers in slices])


def spans_positions(values: Tensor, positions: Tensor | None, trailing: int = 1) -> bool:
    """Whether ``values`` holds ``trailing`` more dimensions (a feature vector: 1; a token id: 0) at
    each of the batch's (batch, sequence) ``positions``; a pooled (batch, features) tensor does not,
    even where its features number the sequence's length."""
    return (positions is not None and values.dim() >= positions.dim() + trailing
            and tuple(values.shape[:positions.dim()]) == tuple(positions.shape))


class _Accumulator:
    """Running sums for one layer's statistics, filled by a forward hook."""

    def __init__(self, module: nn.Module):
        self.module, self.total, self.sum, self.count = module, None, None, 0

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        inputs, positions = args[0].detach(), _POSITIONS.get()
        if spans_positions(inputs, positions, trailing=0 if isinstance(module, nn.Embedding) else 1):
            inputs = inputs[positions]  # padding is no input the layer will see in use
        if isinstance(module, nn.Embedding):
            counts = torch.bincount(inputs.reshape(-1), minlength=module.num_embeddings).float()
            self._add(counts, None, inputs.numel())
            return
        rows = _matmul_inputs(module, inputs).float()  # float32 sums of ≤ 1e6 rows: ample
        self._add(rows.T @ rows, rows.sum(0), len(rows))

    def _add(self, value: Tensor, total: Tensor | None, count: int) -> None:
        self.total = value if self.total is None else self.total + value
        self.sum = total if self.sum is None else self.sum + total
        self.count += count

    def statistics(self) -> InputStatistics:
        if isinstance(self.module, nn.Embedding):
            return InputStatistics(row_weight=(self.total / self.count).float())
        return InputStatistics(gram=(self.total / self.count).float(), mean=(self.sum / self.count).float())


def _matmul_inputs(module: nn.Module, x: Tensor) -> Tensor:
    """The rows the layer's weight matrix multiplies: features for a Linear, im2col patches for a
    convolution (the input groups stacked, so a grouped convolution's statistics are the mean
    over its groups: exact for one group, an approximation for several)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, module.in_features)
    padding = module.padding
    if isinstance(padding, str) or module.padding_mode != "zeros":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x, padding = F.pad(x, module._reversed_padding_repeated_twice, mode=mode), (0,) * len(module.kernel_size)
    if isinstance(module, nn.Conv1d):
        x, kernel, dilation, stride, padding = (x.unsqueeze(2), (1, *module.kernel_size), (1, *module.dilation),
                                                (1, *module.stride), (0, *padding))
    else:
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (batch, C·k, L)
    per_group = patches.shape[1] // module.groups
    return patches.reshape(patches.shape[0], module.groups, per_group, -1).permute(0, 1, 3, 2).reshape(-1, per_group)


_POSITIONS: ContextVar[Tensor | None] = ContextVar("positions", default=None)


@contextmanager
def counting(positions: Tensor | None):
    """Within the block, statistics count only the (batch, sequence) positions where
    ``positions`` is true (the real tokens of a padded batch); everything when None."""
    token = _POSITIONS.set(None if positions is None else positions.bool())
    try:
        yield
    finally:
        _POSITIONS.reset(token)


@contextmanager
def capturing(modules: dict[str, nn.Module]):
    """Within the block, forward passes accumulate each named module's input statistics; yields
    a function returning them as {name: InputStatistics}."""
    accumulators = {name: _Accumulator(module) for name, module in modules.items()}
    handles = [module.register_forward_hook(accumulators[name]) for name, module in modules.items()]
    try:
        yield lambda: {name: acc.statistics() for name, acc in accumulators.items() if acc.count}
    finally:
        for handle in handles:
            handle.remove()


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's repeated blocks: the ModuleList of ≥ 2 modules of one type holding the most
    parameters (``encoder.layer`` of a BERT, ``model.layers`` of a decoder LM), if any."""
    best = None
    for name, module in model.named_modules():
        if (isinstance(module, nn.ModuleList) and len(module) >= 2
                and len({type(child) for child in module}) == 1):
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    return None if best is None else (best[1], best[2])


class _Stop(Exception):
    """Raised by the capture hook so that a forward pass ends at the first block."""


def _stop(module: nn.Module, args: tuple) -> None:
    raise _Stop


def statistics_pass(model: nn.Module, forward: Callable[[nn.Module, Any], Any], batch: Any,
                    positions: Tensor | None, skip: nn.Module | None = None) -> None:
    """One forward pass whose only use is the statistics hooks collect. With ``skip`` (a final
    layer nobody collects from, such as a language model's output layer, which over Gemma's
    262,144 words costs more than all its blocks together), the pass stops before it."""
    handle = skip.register_forward_pre_hook(_stop) if skip is not None else None
    try:
        with counting(positions), torch.no_grad():
            forward(model, batch)
    except _Stop:
        pass
    finally:
        if handle is not None:
            handle.remove()


@contextmanager
def predicting(head: nn.Module, chunk: int = 64) -> Iterator[Callable[[], Tensor]]:
    """While open, every pass that reaches ``head`` adds the softmax of its outputs at every (real)
    position and stops there; yields a function giving the mean so far: how much probability a
    language model gives each token. The head runs on ``chunk`` positions at a time, so a batch's
    full logits (Gemma: 2 GB) are never held at once (at 64 positions: 2,081 MiB peak for a pass
    of Gemma, 2,459 at 256, no slower). Logit transforms outside the head (soft-capping) are not
    applied. Other hooks on the pass (``capturing``) collect as usual: one pass serves both."""
    total, count = torch.zeros(head.out_features, dtype=torch.float64), 0

    def record(module: nn.Module, args: tuple) -> None:
        nonlocal total, count
        inputs, where = args[0].detach(), _POSITIONS.get()
        inputs = inputs[where] if where is not None else inputs.reshape(-1, inputs.shape[-1])
        for start in range(0, len(inputs), chunk):
            logits = module.forward(inputs[start:start + chunk])  # not module(): that would call this hook again
            total += torch.softmax(logits.float(), -1).sum(0).double().cpu()
        count += len(inputs)
        raise _Stop

    handle = head.register_forward_pre_hook(record)
    try:
        yield lambda: (total / max(count, 1)).float()
    finally:
        handle.remove()


def predicted_probabilities(model: nn.Module, head: nn.Module, forward: Callable[[nn.Module, Any], Any],
                            batches: Iterable[Any], positions: Callable[[Any], Tensor | None] = lambda batch: None,
                            chunk: int = 64) -> Tensor:
    """The mean over every (real) position of the batches of the softmax of ``head``'s outputs
    (``predicting``), each pass stopping before the head."""
    with predicting(head, chunk) as mean:
        for batch in batches:
            statistics_pass(model, forward, batch, positions(batch))
        return mean()


class Blocks:
    """A model's blocks run one at a time on captured hidden states (one tensor per batch)."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, forward: Callable[[nn.Module, Any], Any],
                 batches: Iterable[Any], positions: Callable[[Any], Tensor | None] = lambda batch: None):
        self.model, self.blocks, self.forward, self.batches = model, blocks, forward, list(batches)
        self.positions = [positions(batch) for batch in self.batches]  # which count in statistics

    def first_inputs(self) -> list[Tensor]:
        """The hidden states the first block receives for every batch; also records, in
        ``self.extras``, the other arguments every block receives, which may differ by block (a
        decoder passes sliding-window and full-attention layers their own masks and rotary
        tables). The model runs once, up to its last block; every block but the first passes its
        input through untouched instead of working (its output is not needed: on Gemma-270M the
        blocks' work was 80 s of every pass over 64 windows)."""
        inputs: list[Tensor] = []
        self.extras: list[list[tuple[tuple, dict]]] = [[] for _ in self.blocks]
        returns_tuple = False  # what the first block's real forward gives; the others mimic it

        def note_output(module: nn.Module, args: tuple, output: Any) -> None:
            nonlocal returns_tuple
            returns_tuple = isinstance(output, (tuple, list))

        def pass_through(*args: Any, **kwargs: Any) -> Any:
            hidden = args[0] if args else kwargs["hidden_states"]
            return (hidden,) if returns_tuple else hidden

        def recorder(index: int):
            def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                self.extras[index].append((args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"}))
                if index == 0:
                    inputs.append(hidden)
                if index == len(self.blocks) - 1:
                    raise _Stop
            return record

        handles = [block.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, block in enumerate(self.blocks)]
        handles.append(self.blocks[0].register_forward_hook(note_output))
        later = [block for block in {id(b): b for b in self.blocks}.values() if block is not self.blocks[0]]  # shared once
        for block in later:
            block.forward = pass_through
        try:
            with torch.no_grad():
                for batch, positions in zip(self.batches, self.positions):
                    try:
                        with counting(positions):
                            self.forward(self.model, batch)
                    except _Stop:
                        pass
        finally:
            for handle in handles:
                handle.remove()
            for block in later:
                del block.forward  # the class's own forward again
        return inputs

    def call(self, index: int, batch: int, hidden: Tensor, block: nn.Module | None = None) -> Tensor:
        """Block ``index`` (or ``block`` in its place, e.g. its uncompressed twin) on the hidden
        states of batch number ``batch``, with that block's own other arguments; gradients flow."""
        args, kwargs = self.extras[index][batch]
        with counting(self.positions[batch]):
            result = (block or self.blocks[index])(hidden, *args, **kwargs)
        return result[0] if isinstance(result, (tuple, list)) else result

    def run(self, index: int, inputs: list[Tensor], block: nn.Module | None = None) -> list[Tensor]:
        """Block ``index`` (or ``block`` in its place) on every batch's hidden states: the next
        block's inputs."""
        with torch.no_grad():
            return [self.call(index, batch, hidden, block) for batch, hidden in enumerate(inputs)]
