"""Drop-in coded layers: Linear, Conv1d, Conv2d and Embedding whose weight is a ``CodedWeight``;
and ``CodedTensor``, any other module's tensor coded (``held.py``).

Each coded layer subclasses the torch layer it replaces (so ``isinstance`` checks, ``extra_repr``
and the conv padding logic keep working) but holds no dense weight: ``weight`` is decoded on
demand. Three forward paths compute the same function:

- ``"auto"`` (the default, however the layer was made or loaded): per call, the compiled kernel's
  "lut" wherever it serves the call (CPU float32, no gradients; it then picks the table or
  decode-then-multiply by its cost model), else the faster torch path: "decode" with gradients
  and training, on CUDA, and on the CPU beyond two input vectors; torch's table product for one
  or two vectors on the CPU (the factor form, no compiler);
- ``"decode"``: decode the weight, then the ordinary matmul / conv;
- ``"lut"``: the lookup-table product. For each input segment x_b and codeword c the table
  P[b, c] = <x_b, c> is computed once; an output is then a sum of table entries picked by codes
  (in the factor form W = Z·C this is the factorised path: x·Cᵀ first, then the sparse Z, each
  pick times its coefficient). Convolutions apply it to im2col patches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .coded import CodedWeight
from .errors import VQCError
from .held import HELD_SUFFIX, HeldTensor, release
from .rotation import Rotation

FORWARD_PATHS = ("auto", "decode", "lut")
#: Input vectors up to which torch's table product beats torch's decode-then-multiply on the CPU
#: (the compiled kernel absent or not serving the call); measured in docs/methods.md.
TORCH_TABLE_VECTORS = 2

#: Constructor arguments of each supported torch layer, recorded in the file so that a coded
#: layer can be rebuilt without the original model.
LAYER_ARGS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Linear: ("in_features", "out_features"),
    nn.Conv1d: ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"),
    nn.Conv2d: ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"),
    nn.Embedding: ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
    HeldTensor: ("shape", "buffer"),
}
BIASLESS = (nn.Embedding, HeldTensor)  # constructors without a ``bias`` argument


def lut_matmul(x: Tensor, code: CodedWeight, input_groups: int = 1) -> Tensor:
    """y = x · Wᵀ through the lookup table, with W given by ``code``.

    ``x`` is (batch, input_groups, cols): grouped convolutions split their rows into
    ``input_groups`` contiguous blocks, block j reading input group j. Returns (batch, rows).
    The compiled kernel computes it where it can (``kernels``); this torch code is the reference
    and the fallback.
    """
    compiled = kernels.lut_matmul(x, code, input_groups)
    y = compiled if compiled is not None else _table_product(x, code, input_groups)
    if code.layout.kept_rows:  # kept rows: their stored values instead of their codes'
        kept = code.kept_row_numbers()
        group = kept // (code.layout.rows // input_groups)
        exact = (x[:, 0] @ code.kept_matrix(x.dtype).T if input_groups == 1
                 else torch.einsum("brc,rc->br", x[:, group], code.kept_matrix(x.dtype)))
        y = y.index_copy(1, kept, exact)
    return y


def _table_product(x: Tensor, code: CodedWeight, input_groups: int) -> Tensor:
    """``lut_matmul`` in torch, from the codes alone."""
    lay = code.layout
    batch, dtype, device = x.shape[0], x.dtype, x.device
    segments = x.reshape(batch, input_groups, lay.segments, lay.dim)
    table = torch.einsum("bjsd,gkd->bjgsk", segments, code.codewords(dtype))
    stored = torch.arange(lay.rows, device=device)
    original = code.permutation()
    input_group = original // (lay.rows // input_groups)  # conv groups follow the original row order
    block = input_group * lay.groups + code.codebook_of_rows(stored)
    seg = torch.arange(lay.segments, device=device)
    index = ((block[:, None] * lay.segments + seg) * lay.k)[..., None] + code.positions()
    picked = table.reshape(batch, math.prod(table.shape[1:]))[:, index]  # (batch, rows, segments, terms)
    picked = (picked * code.coefficients(dtype=dtype)).sum(-1) if lay.factored else picked[..., 0]
    if lay.scale_group:
        picked = picked * code.scale.to(dtype)[:, seg * lay.dim // lay.scale_group]
    y = picked.sum(-1)
    if lay.offset:
        group_sums = x.reshape(batch, input_groups, lay.cols // lay.scale_group, lay.scale_group).sum(-1)[:, input_group]
        y = y + (group_sums * code.offset.to(dtype)).sum(-1)
    if lay.gain:
        y = y * code.gain.to(dtype)
    if lay.permuted:
        y = y[:, torch.argsort(original)]
    return y


class CodedLayer:
    """Mixin shared by the coded layers: the coded weight, its dense view and its forward path;
    and a ``rotation`` (``rotation.py``) where the code holds the weight in a rotated basis."""

    weight_code: CodedWeight
    rotation: Rotation | None
    forward_path: str = "auto"

    @classmethod
    def build(cls, args: dict, code: CodedWeight, bias: Tensor | None, rotation: Rotation | None = None) -> CodedLayer:
        """Make the layer from constructor ``args`` without ever allocating a dense weight."""
        dense_type = next(t for t in LAYER_ARGS if issubclass(cls, t))
        layer = cls.__new__(cls)
        dense_type.__init__(layer, **args, device="meta", **({} if dense_type in BIASLESS else {"bias": bias is not None}))
        del layer._parameters["weight"]
        if bias is not None:
            layer.bias = nn.Parameter(bias)
        layer.weight_code = code
        if rotation is not None and rotation.rows is not None and not rotates_rows(layer):
            raise VQCError(f"a {dense_type.__name__}'s outputs cannot be rotated")
        layer.rotation = rotation
        return layer

    @property
    def weight(self) -> Tensor:
        return self.dense(self.weight_code.decode())

    def dense(self, stored: Tensor) -> Tensor:
        """The layer's weight from the coded weight's decoded one (its rotation undone)."""
        return stored if self.rotation is None else self.rotation.from_stored(stored)

    def stored(self, weight: Tensor) -> Tensor:
        """A weight of this layer as its coded weight holds it (rotated where the layer is)."""
        return weight if self.rotation is None else self.rotation.to_stored(weight)

    def set_forward_path(self, path: str) -> None:
        if path not in FORWARD_PATHS:
            raise VQCError(f"unknown forward path {path!r}: choose from {', '.join(FORWARD_PATHS)}")
        self.forward_path = path

    def _path(self, x: Tensor, vectors: int) -> str:
        """The path a call on ``vectors`` input vectors takes: the one set, or for "auto" "kernel"
        where the compiled kernel serves the call, else on the CPU "lut" (torch's table product)
        for up to ``TORCH_TABLE_VECTORS`` vectors when the codes suffice, else "decode"."""
        if self.forward_path != "auto":
            return self.forward_path
        if kernels.serves(x, self.weight_code):
            return "kernel"
        few = x.device.type == "cpu" and vectors <= TORCH_TABLE_VECTORS
        return "lut" if few and kernels.codes_suffice(x, self.weight_code) else "decode"


class CodedLinear(CodedLayer, nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        if self.rotation is None:
            return self._product(x, self.bias)
        y = self.rotation.outputs(self._product(self.rotation.inputs(x), None))
        return y if self.bias is None else y + self.bias

    def _product(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """x times the stored weight, plus ``bias``."""
        if self._path(x, x.numel() // self.in_features) == "decode":
            return F.linear(x, self.weight_code.decode(), bias)
        y = lut_matmul(x.reshape(-1, 1, self.in_features), self.weight_code)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias


class _CodedConv(CodedLayer):
    """Lookup-table convolution: pad as torch does, im2col, then the grouped table product. The
    "auto" path takes it only where the kernel's cost model says the table beats decoding (few
    output positions); otherwise it decodes (with the compiled kernel where it serves the call) and
    runs torch's convolution, which is faster than im2col and a matrix product."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == len(self.kernel_size) + 1:  # unbatched, as torch's convolutions take it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        patches = self._patches(x)
        path = self._path(x, patches)
        if path == "kernel" and kernels.way(patches, self.weight_code, self.groups) == "decode":
            return self._conv_forward(x, self.dense(kernels.decode(self.weight_code)), self.bias)
        if path == "decode":
            return self._conv_forward(x, self.weight, self.bias)
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
        patches, spatial = self._im2col(x)  # (batch, L, in_channels · kernel), output size
        batch, positions = patches.shape[:2]
        patches = patches.reshape(batch * positions, self.groups, self.weight_code.layout.cols)
        if self.rotation is None:
            y = lut_matmul(patches, self.weight_code, self.groups)
        else:
            y = self.rotation.outputs(lut_matmul(self.rotation.inputs(patches), self.weight_code, self.groups))
        y = y.reshape(batch, positions, self.out_channels).transpose(1, 2).reshape(batch, self.out_channels, *spatial)
        return y if self.bias is None else y + self.bias.reshape(1, -1, *([1] * len(spatial)))

    def _spatial(self, padded: tuple[int, ...]) -> tuple[int, ...]:
        """The output size for an input of spatial size ``padded`` (padding included)."""
        return tuple((size - dil * (k - 1) - 1) // st + 1
                     for size, k, dil, st in zip(padded, self.kernel_size, self.dilation, self.stride))

    def _patches(self, x: Tensor) -> int:
        """How many im2col patches ``x`` gives: the table product's batch."""
        pads = self._reversed_padding_repeated_twice  # (last dim's left, right, …, first dim's left, right)
        padded = tuple(size + pads[-2 * j - 2] + pads[-2 * j - 1] for j, size in enumerate(x.shape[2:]))
        return x.shape[0] * math.prod(self._spatial(padded))


class CodedConv2d(_CodedConv, nn.Conv2d):
    def _im2col(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, stride=self.stride)
        return cols.transpose(1, 2), self._spatial(x.shape[2:])


class CodedConv1d(_CodedConv, nn.Conv1d):
    def _im2col(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        (k,), (dil,), (st,) = self.kernel_size, self.dilation, self.stride
        cols = F.unfold(x.unsqueeze(2), (1, k), dilation=(1, dil), stride=(1, st))
        return cols.transpose(1, 2), self._spatial(x.shape[2:])


class CodedEmbedding(CodedLayer, nn.Embedding):
    """Looks up rows by decoding only the rows asked for ("lut"), or the whole table ("decode").
    A scaled word embedding (Gemma's, which multiplies its rows by ``embed_scale``) keeps that
    factor as a buffer of the same name."""

    forward_path = "lut"

    def forward(self, ids: Tensor) -> Tensor:
        if self.forward_path == "decode":
            rows = F.embedding(ids, self.weight, self.padding_idx)
        else:
            unique, inverse = torch.unique(ids, return_inverse=True)
            rows = self.weight_code.decode_rows(unique)
            rows = (rows if self.rotation is None else self.rotation.rows_from_stored(rows))[inverse]
        return rows * self.embed_scale.to(rows.dtype) if hasattr(self, "embed_scale") else rows


class CodedTensor(CodedLayer, HeldTensor):
    """A tensor of another module, coded: its owner reads the decoded tensor (``held.py``)."""


class ScaledEmbedding(nn.Embedding):
    """The dense twin of a scaled word embedding: rows times ``embed_scale``."""

    def forward(self, ids: Tensor) -> Tensor:
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


def carry_embed_scale(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` the ``embed_scale`` factor of a scaled word embedding ``source`` (a buffer
    the model computes from its config, not one it stores)."""
    if isinstance(source, nn.Embedding) and isinstance(getattr(source, "embed_scale", None), Tensor):
        target.register_buffer("embed_scale", source.embed_scale.detach().clone(), persistent=False)


def rotates_rows(module: nn.Module) -> bool:
    """Whether a layer's outputs may be mixed by a rotation: each output reads the same inputs (a
    Linear, an ungrouped convolution, a tensor decoded whole), not an embedding's rows looked up
    one at a time or a grouped convolution's blocks."""
    return not isinstance(module, nn.Embedding) and getattr(module, "groups", 1) == 1


def codable(module: nn.Module) -> bool:
    """Whether the module is a layer this package can code: a supported torch layer, a subclass
    of one that computes just what it does (``NonDynamicallyQuantizableLinear``, the output
    projection of ``nn.MultiheadAttention``), or a word embedding subclass that only scales its
    rows (``embed_scale``)."""
    return (type(module) in CODED_TYPES or _plain_subclass(module)
            or (isinstance(module, nn.Embedding) and hasattr(module, "embed_scale")))


def _plain_subclass(module: nn.Module) -> bool:
    """A subclass of a supported layer with its parent's forward and no tensors or modules of its own."""
    base = next((t for t in CODED_TYPES if isinstance(module, t)), None)
    return (base is not None and not isinstance(module, (CodedLayer, HeldTensor)) and type(module).forward is base.forward
            and set(module._parameters) <= {"weight", "bias"} and not module._buffers and not module._modules)


CODED_TYPES: dict[type[nn.Module], type[CodedLayer]] = {
    nn.Linear: CodedLinear,
    nn.Conv1d: CodedConv1d,
    nn.Conv2d: CodedConv2d,
    nn.Embedding: CodedEmbedding,
    HeldTensor: CodedTensor,
}


def dense_type_of(module: nn.Module) -> type[nn.Module]:
    """The torch layer type a (dense or coded) supported layer is."""
    return next(t for t in LAYER_ARGS if isinstance(module, t))


def layer_args(module: nn.Module) -> dict:
    """The constructor arguments of a supported layer, JSON-ready."""
    args = {name: getattr(module, name) for name in LAYER_ARGS[dense_type_of(module)]}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}


def coded_from_dense(module: nn.Module, code: CodedWeight, rotation: Rotation | None = None) -> CodedLayer:
    """Replace a dense layer by its coded twin, keeping its bias and settings; ``rotation``: the
    basis the code holds the weight in."""
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        raise VQCError("an Embedding with max_norm rewrites its weight in place and cannot be coded")
    if math.prod(code.layout.shape) != module.weight.numel():
        raise VQCError(f"coded weight of shape {code.layout.shape} does not fit a weight of shape {tuple(module.weight.shape)}")
    bias = getattr(module, "bias", None)
    layer = CODED_TYPES[dense_type_of(module)].build(layer_args(module), code, None if bias is None else bias.data, rotation)
    carry_embed_scale(module, layer)
    layer.train(module.training)
    return layer


def coded_from_args(type_name: str, args: dict, code: CodedWeight, has_bias: bool,
                    rotation: Rotation | None = None) -> CodedLayer:
    """Rebuild a coded layer from what the file records (the bias is filled by ``load_state_dict``)."""
    by_name = {t.__name__: c for t, c in CODED_TYPES.items()}
    if type_name not in by_name:
        raise VQCError(f"unsupported coded layer type {type_name!r} in file")
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    bias = torch.zeros(args.get("out_features", args.get("out_channels", 0))) if has_bias else None
    return by_name[type_name].build(args, code, bias, rotation)


def iter_coded(model: nn.Module):
    """(name, layer) for every coded layer in ``model``."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, CodedLayer))


def set_forward_path(model: nn.Module, path: str) -> None:
    """Switch every coded matmul/conv layer of ``model`` to ``path`` ("auto", "decode" or "lut")."""
    for _, layer in iter_coded(model):
        if not isinstance(layer, CodedEmbedding):
            layer.set_forward_path(path)


def dense_from_coded(layer: CodedLayer) -> nn.Module:
    """The plain torch layer with the decoded weight: what ``vqc decompress`` writes."""
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in layer_args(layer).items()}
    dense_type = dense_type_of(layer)
    bias = {} if dense_type is nn.Embedding else {"bias": layer.bias is not None}
    dense = (ScaledEmbedding if hasattr(layer, "embed_scale") else dense_type)(**args, **bias, device="meta")
    carry_embed_scale(layer, dense)
    dense.weight = nn.Parameter(layer.weight.detach())
    if getattr(layer, "bias", None) is not None:
        dense.bias = nn.Parameter(layer.bias.detach().clone())
    return dense


def densify(model: nn.Module) -> nn.Module:
    """Replace every coded layer of ``model`` (in place) by its decoded dense twin; a coded tensor
    goes back into its owner as the plain tensor it was."""
    for name, layer in list(iter_coded(model)):
        if isinstance(layer, CodedTensor):
            owner, _, holder = name.rpartition(".")
            release(model.get_submodule(owner), holder.removesuffix(HELD_SUFFIX), layer.weight.detach())
            continue
        dense = dense_from_coded(layer).to(layer.weight_code.codes.device)
        if not name:  # the model is itself one coded layer
            return dense
        model.set_submodule(name, dense)
    return model
