"""Calibration from what users have: example inputs, data loaders, text; the task inferred."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import vqcompress as vqc
from vqcompress.budget import ModelAverage
from vqcompress.errors import VQCError
from vqcompress.inputs import as_training_data, infer_task, is_causal_lm


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()


def _error(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x) - reference(x)).square().sum() / reference(x).square().sum())


def test_a_list_of_example_tensors_calibrates():
    """The call that was refused ("calibration must be a TrainingData"): a list of inputs."""
    examples = [torch.randn(32, 256, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    data_free = vqc.compress(_mlp(), "jlcm", ModelAverage(2), progress=False)
    calibrated = vqc.compress(_mlp(), "jlcm", 2, calibration=examples, progress=False)
    assert vqc.report(calibrated).model_bits_per_weight <= 2  # a model average now
    assert _error(calibrated, _mlp(), examples[0]) < _error(data_free, _mlp(), examples[0])


def test_a_data_loader_of_inputs_and_labels_calibrates_and_fine_tunes():
    """(inputs, labels) batches: the model takes the inputs; a classifier's labels join the loss."""
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(64, 256, generator=generator), torch.randint(0, 256, (64,))),
                        batch_size=16)
    data = as_training_data(loader, _mlp())
    assert data.calibration_batches == 4
    images, labels = data.batch_at(0)
    assert data.task.forward(_mlp(), (images, labels)).shape == (16, 256)
    model = vqc.compress(_mlp(), "kmeans", 3, calibration=loader, finetune_steps=2, progress=False)
    assert vqc.report(model).coded


def test_dict_examples_of_an_encoder_match_its_token_states(tiny_masked_lm_folder):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(tiny_masked_lm_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_masked_lm_folder)
    example = dict(tokenizer(["a first sentence", "and a second, longer one"], padding=True, return_tensors="pt"))
    task = infer_task(model, example)
    assert task.positions(example) is example["attention_mask"]
    assert task.forward(model, example).shape[:2] == example["input_ids"].shape


def test_text_calibrates_a_causal_lm_through_its_own_tokenizer(tiny_lm_folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_folder).eval()
    assert is_causal_lm(model)
    data = as_training_data("lee-background", model, samples=2)
    assert data.batch_at(0)["input_ids"].shape[1] == 512
    texts = as_training_data(["Some text about compression. " * 200], model)
    assert texts.calibration_batches >= 1


def test_text_without_a_tokenizer_and_bad_examples_fail_in_one_line():
    with pytest.raises(VQCError, match="tokenizer"):
        as_training_data("wiki", _mlp())
    with pytest.raises(VQCError, match="no examples"):
        as_training_data([], _mlp())
    with pytest.raises(VQCError, match="must be a tensor"):
        as_training_data([1, 2, 3], _mlp())
    with pytest.raises(VQCError, match="calibration must be"):
        as_training_data(3.5, _mlp())


def test_a_softmax_output_is_matched_as_distributions():
    """A recognizer whose graph ends in a softmax: squared differences of probabilities near 0 and 1
    hardly see a changed decision, so its outputs are matched by their KL."""
    model = nn.Sequential(nn.Linear(8, 5), nn.Softmax(-1))
    task = infer_task(model, torch.randn(3, 4, 8))
    x = torch.randn(3, 4, 8)
    teacher = model(x)
    flipped = teacher.flip(-1)
    assert float(task.loss(teacher, teacher, x)) == pytest.approx(0, abs=1e-6)
    assert float(task.loss(flipped, teacher, x)) > 0.1
