"""Tensors a module holds itself, moved into a module of their own so that they code like a layer's weight.

``nn.MultiheadAttention``'s ``in_proj_weight``, an LSTM's ``weight_ih_l0``, the constant a MatMul
reads in a graph converted from ONNX (onnx2torch keeps those as buffers of an ``initializers``
module), a learned position table: floating tensors of ≥ 2 dimensions that no Linear, Conv or
Embedding owns. ``hold`` moves one into a ``HeldTensor`` beside it (named after it, plus
``HELD_SUFFIX``), as that module's ``weight``; the owner still reads it under its old name: its
class becomes a subclass of the same name whose ``__getattr__`` finds it there, so every read —
the owner's own forward, an RNN's weight cache, a TransformerEncoderLayer's fast path reading its
attention's weights — sees it. The rest of the package sees a layer with a ``weight`` like any
other: it is coded (``layers.CodedTensor``, whose ``weight`` decodes), saved, loaded and counted.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import VQCError

HELD_SUFFIX = "_coded"  # the holder of tensor ``x`` is the owner's module ``x_coded``
_HOLDING: dict[type, type] = {}  # original class → its holding subclass


class HeldTensor(nn.Module):
    """A tensor of another module (a parameter, or a persistent buffer: ``buffer``) held as ``weight``."""

    def __init__(self, shape: tuple[int, ...], buffer: bool = False, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.shape, self.buffer = tuple(shape), buffer
        self.weight = nn.Parameter(torch.empty(self.shape, device=device), requires_grad=not buffer)

    @classmethod
    def of(cls, tensor: Tensor, buffer: bool) -> HeldTensor:
        """A holder of ``tensor`` itself (the very object, so that training and tied weights see one tensor)."""
        held = cls(tuple(tensor.shape), buffer, device="meta")
        del held._parameters["weight"]
        if buffer:
            held.register_buffer("weight", tensor)
        else:
            held.register_parameter("weight", tensor)
        return held

    def forward(self) -> Tensor:
        return self.weight

    def extra_repr(self) -> str:
        return f"shape={self.shape}" + (", buffer" if self.buffer else "")


def hold(owner: nn.Module, name: str, held: HeldTensor) -> None:
    """Move ``owner``'s tensor ``name`` into ``held`` (``HeldTensor.of`` it), where the owner then reads it."""
    if name in owner._parameters:
        del owner._parameters[name]
    else:
        del owner._buffers[name]
    owner.__class__ = _holding_class(type(owner))
    owner.add_module(name + HELD_SUFFIX, held)
    if hasattr(owner, "_flat_weights_names") and not getattr(owner, "_drops_held_cache", False):
        owner.register_forward_hook(_drop_held_cache)
        owner._drops_held_cache = True


def release(owner: nn.Module, name: str, value: Tensor) -> None:
    """Put tensor ``name`` back into ``owner`` as a plain parameter (or buffer) holding ``value``;
    the owner's own class comes back with its last held tensor."""
    held = owner._modules.pop(name + HELD_SUFFIX)
    if held.buffer:
        owner.register_buffer(name, value)
    else:
        owner.register_parameter(name, nn.Parameter(value, requires_grad=held.weight.requires_grad))
    if not any(isinstance(module, HeldTensor) for module in owner._modules.values()):
        owner.__class__ = type(owner).__mro__[1]


def hold_named(model: nn.Module, holder: str) -> None:
    """Hold the tensor that the holder name ``owner.x_coded`` stands for, in a model that does not
    hold it yet (a file's coded tensor, loaded into a fresh model)."""
    owner_name, _, holder_name = holder.rpartition(".")
    name = holder_name.removesuffix(HELD_SUFFIX)
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError:
        owner = None
    if owner is None or not (name in owner._parameters or name in owner._buffers) or holder_name == name:
        raise VQCError(f"the model has no tensor {'.'.join(filter(None, [owner_name, name]))!r} that the file "
                       "codes: is it the same architecture?")
    hold(owner, name, HeldTensor.of(getattr(owner, name), name in owner._buffers))


def _holding_class(cls: type) -> type:
    """``cls`` with a ``__getattr__`` that reads held tensors from their holders (one per class)."""
    if getattr(cls, "_holds_tensors", False):
        return cls
    if cls not in _HOLDING:
        def __getattr__(self, name: str):
            held = self.__dict__["_modules"].get(name + HELD_SUFFIX)
            return held.weight if isinstance(held, HeldTensor) else cls.__getattr__(self, name)

        _HOLDING[cls] = type(cls.__name__, (cls,), {"__getattr__": __getattr__, "_holds_tensors": True,
                                                    "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return _HOLDING[cls]


def _drop_held_cache(owner: nn.Module, args: tuple, output: object) -> None:
    """After a call: an RNN keeps the weights it ran with (``_flat_weights``); the decoded ones go,
    so that a coded RNN holds no dense copy between calls (the next call finds them changed and
    reads them afresh). A tensor held as it is (not coded) stays."""
    decoded = {name for name in owner._flat_weights_names
               if isinstance(owner._modules.get(name + HELD_SUFFIX), HeldTensor)
               and type(owner._modules[name + HELD_SUFFIX]) is not HeldTensor}
    owner._flat_weights = [None if name in decoded else weight
                           for name, weight in zip(owner._flat_weights_names, owner._flat_weights)]
