"""Fashion-MNIST zoo: idx parsing and its errors, model shapes, VQ-friendly layer widths, cache errors.

Training takes minutes, so the trained-accuracy check is marked slow (``make test-slow``).
"""

import gzip

import numpy as np
import pytest
import torch
from torch import nn

from vqcompress.errors import VQCError
from vqcompress.models import fashion
from vqcompress.suites.fashion import evaluate


def write_idx(path, array: np.ndarray, magic: int | None = None) -> None:
    """An idx file as the dataset ships it: big-endian magic, big-endian sizes, then the bytes."""
    magic = magic if magic is not None else 0x0800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_root(tmp_path):
    """A dataset folder holding a 5-image train split."""
    images = np.arange(5 * 28 * 28).reshape(5, 28, 28) % 256
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 9]))
    return tmp_path


def test_load_split_shapes_and_dtypes(fake_root):
    images, labels = fashion.load_split("train", root=fake_root)
    assert images.shape == (5, 1, 28, 28) and images.dtype == torch.float32
    assert labels.tolist() == [0, 1, 2, 3, 9] and labels.dtype == torch.int64
    assert images[0, 0, 0, 1].item() == pytest.approx((1 / 255 - fashion.MEAN) / fashion.STD)


def test_missing_file_names_the_package(fake_root):
    (fake_root / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(VQCError, match="train-labels.*dataset-fashion-mnist"):
        fashion.load_split("train", root=fake_root)


def test_truncated_file_is_refused(fake_root):
    path = fake_root / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(VQCError, match="train-images.*dataset-fashion-mnist"):
        fashion.load_split("train", root=fake_root)


def test_wrong_magic_is_refused(fake_root):
    write_idx(fake_root / "train-images-idx3-ubyte.gz", np.zeros((5, 28, 28)), magic=0x0D03)
    with pytest.raises(VQCError, match="magic.*dataset-fashion-mnist"):
        fashion.load_split("train", root=fake_root)


def test_header_that_disagrees_with_the_data_is_refused(fake_root):
    path = fake_root / "train-labels-idx1-ubyte.gz"
    with gzip.open(path, "wb") as handle:
        handle.write((0x0801).to_bytes(4, "big") + (6).to_bytes(4, "big") + bytes(5))
    with pytest.raises(VQCError, match="dataset-fashion-mnist"):
        fashion.load_split("train", root=fake_root)


def test_images_and_labels_of_different_lengths_are_refused(fake_root):
    write_idx(fake_root / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2]))
    with pytest.raises(VQCError, match="do not match.*dataset-fashion-mnist"):
        fashion.load_split("train", root=fake_root)


@pytest.mark.parametrize("name", sorted(fashion.ZOO))
def test_forward_gives_ten_logits(name):
    model = fashion.ZOO[name].build().eval()
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("name", sorted(fashion.ZOO))
def test_every_weight_but_the_first_conv_has_inputs_in_multiples_of_8(name):
    """Sub-vectors of d = 4 or 8 along the reduction dim then tile every row."""
    layers = [m for m in fashion.ZOO[name].build().modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    widths = [m.in_features if isinstance(m, nn.Linear) else m.in_channels * m.kernel_size[0] * m.kernel_size[1]
              for m in layers]
    assert isinstance(layers[0], nn.Conv2d) and layers[0].in_channels == 1
    assert all(width % 8 == 0 for width in widths[1:]), widths
    assert not any(isinstance(m, nn.MultiheadAttention) for m in fashion.ZOO[name].build().modules())


def test_corrupt_cached_checkpoint_says_delete_or_retrain(tmp_path, monkeypatch):
    monkeypatch.setenv("VQC_CACHE", str(tmp_path))
    path = fashion.checkpoint_path("fashion-cnn")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(VQCError, match="corrupt.*delete it or retrain"):
        fashion.load_zoo_model("fashion-cnn", train_if_missing=False)


def test_untrained_model_without_training_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("VQC_CACHE", str(tmp_path))
    with pytest.raises(VQCError, match="vqc zoo train fashion-vit"):
        fashion.load_zoo_model("fashion-vit", train_if_missing=False)


def test_unknown_names_are_errors():
    with pytest.raises(VQCError, match="fashion-cnn"):
        fashion.load_zoo_model("fashion-mlp")
    with pytest.raises(VQCError, match="train or test"):
        fashion.load_split("validation")


def test_short_runs_never_replace_the_zoo_model():
    assert fashion.checkpoint_path("fashion-cnn", epochs=1) != fashion.checkpoint_path("fashion-cnn")
    assert fashion.checkpoint_path("fashion-cnn", epochs=fashion.ZOO["fashion-cnn"].epochs) == \
        fashion.checkpoint_path("fashion-cnn")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(fashion.ZOO))
def test_trained_model_reaches_its_stated_accuracy(name):
    """Trains into the cache first if needed (minutes on a CPU)."""
    model = fashion.load_zoo_model(name)
    assert evaluate(model)["accuracy"] >= 100 * fashion.ZOO[name].target


@pytest.mark.slow
def test_same_seed_same_weights(tmp_path, monkeypatch):
    """One epoch twice from seed 0: bit-identical checkpoints (about two CPU minutes)."""
    from safetensors.torch import load_file

    runs = []
    for run in ("a", "b"):
        monkeypatch.setenv("VQC_CACHE", str(tmp_path / run))
        runs.append(load_file(fashion.train("fashion-cnn", seed=0, progress=False, epochs=1)))
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][key], runs[1][key]) for key in runs[0])
