"""Calibration: statistics that predict a layer's output error exactly, and blocks run one at a time."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from vqcompress.calibrate import (
    Blocks,
    InputStatistics,
    capturing,
    counting,
    find_blocks,
    predicted_probabilities,
    statistics_pass,
)


def _captured(module: nn.Module, *inputs: torch.Tensor) -> InputStatistics:
    with capturing({"m": module}) as collected, torch.no_grad():
        for x in inputs:
            module(x)
        return collected()["m"]


def test_linear_statistics_give_the_output_error():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8, bias=False)
    x = torch.randn(3, 5, 16) * torch.linspace(0.1, 3, 16)
    stats = _captured(layer, x[:2], x[2:])
    delta = torch.randn(8, 16)
    truth = (x.reshape(-1, 16) @ delta.T).square().sum(1).mean()
    assert stats.error(delta) == pytest.approx(float(truth), rel=1e-4)
    assert torch.allclose(stats.mean, x.reshape(-1, 16).mean(0), atol=1e-6)
    assert torch.allclose(stats.importance(), stats.gram.diagonal()[None])


@pytest.mark.parametrize("conv", [nn.Conv2d(4, 6, 3, padding=1, bias=False),
                                  nn.Conv2d(3, 5, (3, 2), stride=2, bias=False),
                                  nn.Conv1d(4, 4, 3, padding="same", bias=False)])
def test_convolution_statistics_give_the_output_error(conv):
    torch.manual_seed(0)
    x = torch.randn(2, conv.in_channels, *([7, 6] if isinstance(conv, nn.Conv2d) else [9]))
    stats = _captured(conv, x)
    delta = torch.randn_like(conv.weight)
    out = conv._conv_forward(x, delta, None)
    positions = out.numel() // out.shape[1]
    truth = out.square().sum() / positions
    assert stats.error(delta.reshape(delta.shape[0], -1)) == pytest.approx(float(truth), rel=1e-4)


def test_embedding_statistics_count_lookups():
    embedding = nn.Embedding(10, 4)
    stats = _captured(embedding, torch.tensor([[1, 1, 3], [1, 9, 3]]))
    assert stats.row_weight.tolist() == pytest.approx([0, 3 / 6, 0, 2 / 6, 0, 0, 0, 0, 0, 1 / 6])
    delta = torch.ones(10, 4)
    assert stats.error(delta) == pytest.approx(4.0)  # each lookup's output moves by 4 (squared)


def test_predicted_probabilities_are_the_mean_softmax_of_the_head_over_real_positions():
    """A few positions at a time, padding left out, and the model's own pass stops at the head."""
    torch.manual_seed(0)
    body, head, calls = nn.Linear(4, 4), nn.Linear(4, 50), []
    model = nn.Sequential(body, head)
    head.register_forward_hook(lambda *args: calls.append(1))
    batches = [torch.randn(2, 3, 4), torch.randn(2, 3, 4)]
    real = [torch.tensor([[True, True, False], [True, False, False]]), torch.ones(2, 3, dtype=torch.bool)]
    mean = predicted_probabilities(model, head, lambda m, batch: m(batch[0]), zip(batches, real),
                                   lambda batch: batch[1], chunk=2)
    assert not calls
    with torch.no_grad():
        logits = torch.cat([head(body(x[mask])) for x, mask in zip(batches, real)])
    assert torch.allclose(mean, torch.softmax(logits, -1).mean(0), atol=1e-6)
    assert mean.sum() == pytest.approx(1.0)


def test_centred_statistics_leave_the_error_a_bias_cannot_absorb():
    torch.manual_seed(0)
    x = torch.randn(1000, 6) + torch.tensor([5.0, 0, 0, 0, 0, -2])
    stats = _captured(nn.Linear(6, 3), x)
    delta = torch.randn(3, 6)
    residual = (x - x.mean(0)) @ delta.T
    assert stats.centred().error(delta) == pytest.approx(float(residual.square().sum(1).mean()), rel=1e-3)
    damped = stats.damped(0.5)
    assert torch.allclose(damped.gram - stats.gram, 0.5 * stats.gram.diagonal().mean() * torch.eye(6))


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    return BertModel(config).eval()


def test_blocks_run_one_at_a_time_give_the_model_output(bert):
    prefix, found = find_blocks(bert)
    assert prefix == "encoder.layer"
    batches = [{"input_ids": torch.randint(0, 50, (2, 7)), "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2])}]
    blocks = Blocks(bert, found, lambda model, batch: model(**batch).last_hidden_state, batches)
    inputs = blocks.first_inputs()
    for index in range(len(blocks.blocks)):
        inputs = blocks.run(index, inputs)
    with torch.no_grad():
        expected = bert(**batches[0]).last_hidden_state
    assert torch.allclose(inputs[0], expected, atol=1e-5)


def test_first_inputs_skips_the_work_of_every_block_but_the_first(bert):
    """Only the arguments of the later blocks are needed, not their work; their own forward is
    back afterwards."""
    _, found = find_blocks(bert)
    calls = []
    handles = [found[i].intermediate.dense.register_forward_hook(lambda *_, i=i: calls.append(i)) for i in range(3)]
    batches = [{"input_ids": torch.randint(0, 50, (2, 7))}]
    blocks = Blocks(bert, found, lambda model, batch: model(**batch).last_hidden_state, batches)
    blocks.first_inputs()
    assert calls == [0] and all(len(extras) == 1 for extras in blocks.extras)
    blocks.run(2, [torch.zeros(2, 7, 16)])
    for handle in handles:
        handle.remove()
    assert calls == [0, 2] and "forward" not in vars(found[2])


def test_a_model_without_repeated_blocks_has_none():
    assert find_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU())) is None


def test_padding_positions_do_not_count():
    """A padded batch's statistics are those of its real tokens alone."""
    torch.manual_seed(0)
    layer, embed = nn.Linear(8, 4), nn.Embedding(10, 8)
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    with capturing({"embed": embed, "layer": layer}) as collected, counting(mask), torch.no_grad():
        layer(embed(ids))
    stats = collected()
    real = embed.weight[torch.tensor([1, 2, 3, 4, 5])].detach()
    assert torch.allclose(stats["layer"].gram, real.T @ real / 5, atol=1e-6)
    assert stats["embed"].row_weight[0] == 0 and torch.allclose(stats["embed"].row_weight[1:6], torch.full((5,), 0.2))


def test_a_pooled_input_as_wide_as_the_sequence_is_not_taken_for_positions():
    """A pooler's (batch, features) input is no (batch, sequence) grid of positions, even where the
    features number the padded sequence's length (a 64-wide BERT on 64-token batches failed)."""
    torch.manual_seed(0)
    pooler = nn.Linear(4, 2)
    pooled = torch.randn(2, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    with capturing({"pooler": pooler}) as collected, counting(mask), torch.no_grad():
        pooler(pooled)
    assert torch.allclose(collected()["pooler"].gram, pooled.T @ pooled / 2, atol=1e-6)


def test_a_statistics_pass_stops_before_an_uncollected_output_layer():
    body, head, calls = nn.Linear(4, 4), nn.Linear(4, 50), []
    model = nn.Sequential(body, head)
    head.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(3, 4)
    with capturing({"body": body}) as collected:
        statistics_pass(model, lambda m, batch: m(batch), x, None, skip=head)
    assert not calls
    assert torch.allclose(collected()["body"].gram, x.T @ x / 3)


@pytest.mark.parametrize("gram", [False, True])
def test_row_errors_in_slices_are_the_whole_difference_s(gram, monkeypatch):
    import vqcompress.coded as coded

    generator = torch.Generator().manual_seed(0)
    difference = torch.randn(50, 8, generator=generator)
    stats = (InputStatistics(gram=torch.eye(8) + 0.1) if gram
             else InputStatistics(row_weight=torch.rand(50, generator=generator)))
    monkeypatch.setattr(coded, "SLICE_WEIGHTS", 64)  # slices of 8 rows: the last one shorter
    sliced = stats.row_errors_in_slices(lambda rows: difference[rows], 50, 8)
    assert torch.allclose(sliced, stats.row_errors(difference), rtol=1e-6)
