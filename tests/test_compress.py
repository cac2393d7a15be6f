"""``compress`` with training: data and steps come together, and vqdnn learns in training."""

from __future__ import annotations

import copy
import importlib
import logging

import pytest
import torch
from torch import nn

import vqcompress as vqc
from tests.test_finetune import batch_at, distillation_loss, mlp
from vqcompress.budget import ModelAverage, PerLayer
from vqcompress.errors import VQCError
from vqcompress.finetune import TrainingData, classification_task, finetune
from vqcompress.layers import iter_coded

DATA = TrainingData(classification_task(), batch_at)
EVERY_LAYER = vqc.Plan(min_weights=0)


@pytest.mark.parametrize(("method", "calibration", "steps", "options", "message"), [
    ("vqdnn", None, 0, {}, "learns its codebooks in training"),
    ("vqdnn", DATA, 0, {}, "learns its codebooks in training"),
    ("kmeans", None, 10, {}, "needs training data"),
    ("kmeans", DATA, -1, {}, "≥ 0"),
    ("vqdnn", DATA, 10, {"assignments": "annealed"}, "assignments must be one of"),
])
def test_training_arguments_are_checked_before_work(method, calibration, steps, options, message):
    model = mlp()
    with pytest.raises(VQCError, match=message):
        vqc.compress(model, method, bits=1, calibration=calibration, finetune_steps=steps, plan=EVERY_LAYER,
                     progress=False, **options)
    assert not list(iter_coded(model))


def test_vqdnn_and_finetuned_kmeans_beat_plain_kmeans():
    teacher = mlp()
    plain = vqc.compress(copy.deepcopy(teacher), "kmeans", bits=1, plan=EVERY_LAYER, progress=False)
    tuned = vqc.compress(copy.deepcopy(teacher), "kmeans", bits=1, calibration=DATA, finetune_steps=60, finetune_lr=3e-3,
                         plan=EVERY_LAYER, progress=False)
    learned = vqc.compress(copy.deepcopy(teacher), "vqdnn", bits=1, calibration=DATA, finetune_steps=60, finetune_lr=1e-3,
                           plan=EVERY_LAYER, progress=False)
    assert distillation_loss(tuned, teacher) < distillation_loss(plain, teacher)
    assert distillation_loss(learned, teacher) < distillation_loss(plain, teacher)
    assert vqc.report(learned).coded_bits == vqc.report(plain).coded_bits
    assert {layer.weight_code.recipe["method"] for _, layer in iter_coded(learned)} == {"vqdnn"}


@pytest.mark.parametrize(("large_from", "expected"), [(10**9, 1e-3), (1_000, 1e-4)])
def test_the_fine_tuning_rate_follows_the_models_size_unless_given(monkeypatch, large_from, expected):
    rates = []
    monkeypatch.setattr("vqcompress.defaults.LARGE_MODEL", large_from)
    monkeypatch.setattr(importlib.import_module("vqcompress.compress"), "finetune",
                        lambda *args, lr, **kwargs: rates.append(lr))
    vqc.compress(mlp(), "vqdnn", bits=1, calibration=DATA, finetune_steps=2, plan=EVERY_LAYER, progress=False)
    vqc.compress(mlp(), "vqdnn", bits=1, calibration=DATA, finetune_steps=2, finetune_lr=5e-3, plan=EVERY_LAYER,
                 progress=False)
    assert rates == [expected, 5e-3]


# -- shared codebooks (VQ-DNN's group number) ------------------------------------------------------

def deep_mlp() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(64, 64) for _ in range(4)]
    for i, layer in enumerate(layers):  # layers of different magnitude: what the per-layer gain is for
        layer.weight.data *= 2.0**i
    return nn.Sequential(*layers).eval()


def codebooks_of(model: nn.Module) -> list[torch.Tensor]:
    return [layer.weight_code.codebook for _, layer in iter_coded(model)]


def test_one_shared_codebook_is_one_tensor_counted_once(tmp_path):
    model = vqc.compress(deep_mlp(), "kmeans", bits=2, shared=1, scale="none", plan=EVERY_LAYER, progress=False)
    books = codebooks_of(model)
    assert len(books) == 4 and all(book is books[0] for book in books)
    d, k = books[0].shape[-1], books[0].shape[-2]
    assert (d, k) == (4, 256)  # not charged to one layer, the budget rule may take the longest d
    codes_bits = 4 * 64 * 64 // d * 8
    expected = codes_bits + 16 * k * d + 4 * 16  # the codes, one fp16 codebook, four fp16 gains
    assert vqc.report(model).coded_bits == expected
    path = tmp_path / "shared.vqc"
    vqc.save(model, path)
    assert vqc.report(path).coded_bits == expected
    loaded = vqc.load(path, like=deep_mlp())
    assert all(book is codebooks_of(loaded)[0] for book in codebooks_of(loaded))
    x = torch.randn(5, 64)
    assert torch.equal(loaded(x), model(x))


def test_shared_codebook_serves_layers_of_any_magnitude():
    """Every layer's relative error stays moderate although their scales differ 8-fold."""
    dense = deep_mlp()
    model = vqc.compress(copy.deepcopy(dense), "kmeans", bits=2, shared=1, plan=EVERY_LAYER, progress=False)
    for (name, layer), original in zip(iter_coded(model), dense):
        error = (layer.weight_code.decode() - original.weight).norm() / original.weight.norm()
        assert error < 0.5, name


def test_lookup_table_equals_decode_with_a_gain():
    model = vqc.compress(deep_mlp(), "kmeans", bits=2, shared=1, scale="row", plan=EVERY_LAYER, progress=False)
    x = torch.randn(7, 64)
    with torch.no_grad():
        decoded = model(x)
        vqc.set_forward_path(model, "lut")
        assert torch.allclose(model(x), decoded, rtol=1e-4, atol=1e-4)


def test_group_number_cuts_layers_into_runs():
    model = vqc.compress(deep_mlp(), "kmeans", bits=2, shared=2, plan=EVERY_LAYER, progress=False)
    books = codebooks_of(model)
    assert books[0] is books[1] and books[2] is books[3] and books[1] is not books[2]


def test_fine_tuning_trains_the_shared_codebook_as_one():
    teacher = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    plan = vqc.Plan(by_name={"0|2": {}}, min_weights=10**9)  # the two 64 × 64 layers
    before = vqc.compress(copy.deepcopy(teacher), "kmeans", bits=2, shared=1, plan=plan, progress=False)
    student = vqc.compress(copy.deepcopy(teacher), "vqdnn", bits=2, shared=1, calibration=DATA, finetune_steps=5,
                           plan=plan, progress=False)
    books = codebooks_of(student)
    assert len(books) == 2 and books[0] is books[1] and books[0].dtype == torch.float16
    assert not torch.equal(books[0], codebooks_of(before)[0])  # it trained


@pytest.mark.parametrize("options", [{"shared": -1}, {"shared": 1, "groups": 2}])
def test_bad_shared_options_are_refused(options):
    with pytest.raises(VQCError, match="shared"):
        vqc.compress(deep_mlp(), "kmeans", bits=2, plan=EVERY_LAYER, progress=False, **options)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_compress_and_fine_tune_on_cuda(tmp_path):
    """A model on the GPU is compressed and fine-tuned there; its file loads back on CPU, the same."""
    teacher = deep_mlp().to("cuda")
    data = TrainingData(classification_task(), lambda step: tuple(t if t is None else t.to("cuda")
                                                                  for t in batch_at(step)))
    student = vqc.compress(copy.deepcopy(teacher), "vqdnn", bits=2, shared=1, calibration=data, finetune_steps=5,
                           plan=EVERY_LAYER, progress=False)
    assert all(t.device.type == "cuda" for t in student.state_dict().values())
    books = codebooks_of(student)
    assert all(book is books[0] for book in books)
    vqc.save(student, tmp_path / "gpu.vqc")
    on_cpu = vqc.load(tmp_path / "gpu.vqc", like=deep_mlp())
    x = torch.randn(4, 64)
    torch.testing.assert_close(on_cpu(x), student(x.to("cuda")).cpu(), rtol=1e-4, atol=1e-4)


def test_calibrated_fitting_beats_data_free_fitting_on_the_model_output():
    from tests.test_allocate import PLAN, text_batches, tiny_bert

    data = text_batches()
    reference = tiny_bert()
    batch = data.batch_at(0)
    with torch.no_grad():
        target = reference(**batch).last_hidden_state
    errors = []
    for calibration in (None, data):
        model = vqc.compress(tiny_bert(), "kmeans", PerLayer(2), calibration, plan=PLAN, progress=False,
                             scale="row")
        with torch.no_grad():
            errors.append(float((model(**batch).last_hidden_state - target).square().mean()))
    assert errors[1] < errors[0]


def test_bias_correction_keeps_the_mean_output_on_the_calibration_data():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(64, 64))
    x = torch.randn(512, 64) + 3.0  # inputs far from zero mean: the mean error is large

    data = TrainingData(classification_task(), lambda step: (x, None), calibration_batches=1)
    with torch.no_grad():
        expected = layer(x).mean(0)
    coded = vqc.compress(copy.deepcopy(layer), "kmeans", PerLayer(1), data, plan=EVERY_LAYER, progress=False)
    uncorrected = vqc.compress(copy.deepcopy(layer), "kmeans", 1, plan=EVERY_LAYER, progress=False)
    with torch.no_grad():
        assert torch.allclose(coded(x).mean(0), expected, atol=1e-3)
        assert not torch.allclose(uncorrected(x).mean(0), expected, atol=1e-2)


def test_jlcm_compresses_a_model_block_by_block_and_round_trips(tmp_path):
    from tests.test_allocate import PLAN, text_batches, tiny_bert

    model = vqc.compress(tiny_bert(), "jlcm", 3, text_batches(), plan=PLAN, progress=False, steps=5)
    assert vqc.report(model).model_bits_per_weight <= 3
    path = vqc.save(model, tmp_path / "m.vqc")
    loaded = vqc.load(path, like=tiny_bert())
    batch = text_batches().batch_at(0)
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).last_hidden_state, model(**batch).last_hidden_state, atol=1e-5)


@pytest.mark.parametrize("tune_blocks", [0, 2])
def test_an_interrupted_calibrated_compression_resumes_to_the_same_file(tmp_path, monkeypatch, caplog, tune_blocks):
    import importlib

    from tests.test_allocate import PLAN, text_batches, tiny_bert

    options = {"plan": PLAN, "progress": False, "steps": 3, "tune_blocks": tune_blocks}
    whole = vqc.save(vqc.compress(tiny_bert(), "jlcm", 3, text_batches(), **options), tmp_path / "whole.vqc")
    checkpoint = tmp_path / "partial.vqc"
    compress_module = importlib.import_module("vqcompress.compress")  # the package's name is the function
    real_fit_runs, calls = compress_module._fit_runs, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the embeddings and block 0 are done and saved: stop in block 1
            raise KeyboardInterrupt
        return real_fit_runs(*args, **kwargs)

    monkeypatch.setattr(compress_module, "_fit_runs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        vqc.compress(tiny_bert(), "jlcm", 3, text_batches(), checkpoint=checkpoint, **options)
    assert checkpoint.exists()
    monkeypatch.setattr(compress_module, "_fit_runs", real_fit_runs)
    with caplog.at_level(logging.WARNING, logger="vqcompress"):
        resumed = vqc.compress(tiny_bert(), "jlcm", 3, text_batches(), checkpoint=checkpoint, **options)
    assert "resuming from the checkpoint" in caplog.text
    assert not checkpoint.exists()
    assert vqc.save(resumed, tmp_path / "resumed.vqc").read_bytes() == whole.read_bytes()


def test_a_checkpoint_of_other_settings_is_not_resumed(tmp_path, monkeypatch, caplog):
    """An interrupted run at 2.1 bits rerun at 3.1 used to resume the stale checkpoint silently."""
    import importlib

    from tests.test_allocate import PLAN, text_batches, tiny_bert

    options = {"plan": PLAN, "progress": False, "steps": 2}
    whole = vqc.save(vqc.compress(tiny_bert(), "jlcm", 3.1, text_batches(), **options), tmp_path / "whole.vqc")
    checkpoint = tmp_path / "partial.vqc"
    compress_module = importlib.import_module("vqcompress.compress")
    real_fit_runs, calls = compress_module._fit_runs, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_fit_runs(*args, **kwargs)

    monkeypatch.setattr(compress_module, "_fit_runs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        vqc.compress(tiny_bert(), "jlcm", 2.1, text_batches(), checkpoint=checkpoint, **options)
    monkeypatch.setattr(compress_module, "_fit_runs", real_fit_runs)
    with caplog.at_level(logging.WARNING, logger="vqcompress"):
        other = vqc.compress(tiny_bert(), "jlcm", 3.1, text_batches(), checkpoint=checkpoint, **options)
    assert "a checkpoint of another run" in caplog.text
    assert vqc.save(other, tmp_path / "other.vqc").read_bytes() == whole.read_bytes()


def test_tuned_blocks_give_outputs_closer_to_the_original():
    """Block tuning trains each block's codebooks and scales towards the original block's outputs:
    the whole model's output error falls, and the run is deterministic."""
    from tests.test_allocate import PLAN, text_batches, tiny_bert

    data = text_batches()
    batch = data.batch_at(0)
    with torch.no_grad():
        target = tiny_bert()(**batch).last_hidden_state
    errors, outputs = [], []
    for tune_blocks in (0, 4, 4):
        model = vqc.compress(tiny_bert(), "kmeans", PerLayer(2), data, plan=PLAN, progress=False,
                             scale="row", tune_blocks=tune_blocks, block_lr=1e-2)
        with torch.no_grad():
            outputs.append(model(**batch).last_hidden_state)
        errors.append(float((outputs[-1] - target).square().mean()))
    assert errors[1] < 0.9 * errors[0]
    assert torch.equal(outputs[1], outputs[2])


def test_tuning_blocks_needs_data_and_blocks():
    from tests.test_allocate import PLAN, text_batches, tiny_bert

    with pytest.raises(VQCError, match="needs calibration data"):
        vqc.compress(tiny_bert(), "kmeans", 2, plan=PLAN, progress=False, tune_blocks=1)
    with pytest.raises(VQCError, match="needs repeated blocks"):
        vqc.compress(mlp(), "kmeans", 2, DATA, plan=EVERY_LAYER, progress=False, tune_blocks=1)
    with pytest.raises(VQCError, match="≥ 0"):
        vqc.compress(tiny_bert(), "kmeans", 2, text_batches(), plan=PLAN, progress=False, tune_blocks=-1)


class _ScaledEmbedding(nn.Embedding):
    """Like Gemma's word embedding: rows times a scale the model computes (not stored)."""

    def __init__(self, num: int, dim: int) -> None:
        super().__init__(num, dim)
        self.register_buffer("embed_scale", torch.tensor(dim**0.5), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale


class _TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = _ScaledEmbedding(512, 64)
        self.mix = nn.Linear(64, 64)
        self.head = nn.Linear(64, 512, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def test_tied_scaled_embedding_is_coded_once_and_keeps_its_scale(tmp_path):
    from vqcompress.layers import densify

    torch.manual_seed(0)
    model = _TiedLM().eval()
    ids = torch.randint(0, 512, (3, 7))
    dense_out = model(ids)
    compressed = vqc.compress(model, "kmeans", bits=4, progress=False)
    assert compressed.embed.weight_code is compressed.head.weight_code
    assert float(compressed.embed.embed_scale) == pytest.approx(8.0)
    error = (compressed(ids) - dense_out).square().mean() / dense_out.square().mean()
    assert error < 0.1  # 4-bit codes: close to the dense output, scale included
    in_memory = vqc.report(compressed)
    assert [row.name for row in in_memory.coded] == ["embed", "mix"]
    assert in_memory.parameters == 512 * 64 + 64 * 64 + 64
    path = vqc.save(compressed, tmp_path / "tied.vqc")
    assert vqc.report(path).total_bits == in_memory.total_bits
    torch.manual_seed(1)
    loaded = vqc.load(path, like=_TiedLM().eval())
    assert loaded.embed.weight_code is loaded.head.weight_code  # tied again, so training moves both
    assert torch.allclose(loaded(ids), compressed(ids), atol=1e-5)
    finetune(loaded, model, classification_task(), lambda step: (ids, None), steps=2, lr=1e-2, progress=False)
    again = vqc.report(vqc.save(loaded, tmp_path / "tuned.vqc"))
    assert (again.parameters, again.total_bits) == (in_memory.parameters, in_memory.total_bits)
    assert torch.allclose(densify(loaded)(ids), loaded(ids), atol=1e-5)


def test_tuned_blocks_on_a_decoder_with_sliding_and_full_attention(tmp_path):
    """A tiny Gemma-3 (sliding-window and full-attention layers, each with its own mask and
    rotary table): block tuning runs, and the file it writes gives the same logits."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from vqcompress.finetune import causal_lm_task

    def tiny() -> nn.Module:
        torch.manual_seed(0)
        config = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=4,
                                  layer_types=["sliding_attention", "sliding_attention", "full_attention"])
        return Gemma3ForCausalLM(config).eval()

    ids = torch.randint(0, 128, (4, 2, 16), generator=torch.Generator().manual_seed(0))
    data = TrainingData(causal_lm_task(), lambda step: {"input_ids": ids[step % 4]}, calibration_batches=4)
    plan = vqc.Plan(min_weights=0, by_name={r"embed_tokens|lm_head": None})
    model = vqc.compress(tiny(), "kmeans", PerLayer(3), data, plan=plan, progress=False, scale="row",
                         tune_blocks=2)
    loaded = vqc.load(vqc.save(model, tmp_path / "tiny.vqc"), like=tiny())
    with torch.no_grad():
        assert torch.allclose(loaded(ids[0]).logits, model(ids[0]).logits, atol=1e-4)


def test_block_tuning_reports_on_stderr_only(capsys):
    """stdout is the result's (`vqc compress --json`); progress and each block's error go to stderr."""
    from tests.test_allocate import PLAN, text_batches, tiny_bert

    vqc.compress(tiny_bert(), "kmeans", PerLayer(2), text_batches(), plan=PLAN, tune_blocks=1)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "block 0: output error" in captured.err


def test_a_tuning_that_makes_a_block_worse_is_undone():
    """At a step size far too large the tuned blocks would be worse: each is put back as fitted."""
    from tests.test_allocate import PLAN, text_batches, tiny_bert

    data = text_batches()
    options = {"plan": PLAN, "progress": False, "scale": "row"}
    fitted = vqc.compress(tiny_bert(), "kmeans", PerLayer(2), data, **options)
    wild = vqc.compress(tiny_bert(), "kmeans", PerLayer(2), data, tune_blocks=2, block_lr=10.0, **options)
    batch = data.batch_at(0)
    with torch.no_grad():
        assert torch.equal(wild(**batch).last_hidden_state, fitted(**batch).last_hidden_state)


@pytest.mark.parametrize("allocation", [False, True])
def test_kept_rows_are_the_most_used_token_rows_of_a_tied_embedding(tmp_path, allocation):
    """With ``keep_rows``, a tied embedding stores the rows the calibration text uses most
    (``TrainingData.token_counts``, not only the few calibration batches) apart, in int8, for
    both its roles; the file keeps them; a model-average budget pays for them."""
    from vqcompress.finetune import Task

    torch.manual_seed(0)
    model = _TiedLM().eval()
    original = model.embed.weight.detach().clone()
    counts = torch.zeros(400, dtype=torch.int64)  # shorter than the vocabulary: the rest never occur
    counts[[7, 100, 300]] = torch.tensor([50, 40, 30])
    ids = torch.randint(0, 512, (2, 9))
    task = Task(forward=lambda m, batch: m(batch), loss=lambda s, t, batch: (s - t).square().mean())
    data = TrainingData(task, lambda step: ids, calibration_batches=1, token_counts=counts)
    compressed = vqc.compress(model, "kmeans", 3 if allocation else PerLayer(3), data,
                              plan=vqc.Plan(by_name={"embed": {"keep_rows": 3}}), progress=False, scale="row")
    assert vqc.report(compressed).model_bits_per_weight <= 3 or not allocation
    code = compressed.embed.weight_code
    assert code is compressed.head.weight_code and code.layout.kept_rows == 3
    assert code.kept_row_numbers().tolist() == [7, 100, 300]
    kept = original[[7, 100, 300]]
    assert (code.decode()[[7, 100, 300]] - kept).abs().max() <= kept.abs().max() / 254 * 1.01  # int8: half a step
    path = vqc.save(compressed, tmp_path / "kept.vqc")
    assert vqc.report(path).total_bits == vqc.report(compressed).total_bits
    loaded = vqc.load(path, like=_TiedLM().eval())
    assert torch.equal(loaded(ids), compressed(ids))


@pytest.mark.parametrize("kept", [-1, 513, 2.5, "all"])
def test_bad_kept_rows_are_refused_before_work(kept):
    with pytest.raises(VQCError, match="keep_rows"):
        vqc.compress(_TiedLM(), "kmeans", 2, plan=vqc.Plan(by_name={"embed": {"keep_rows": kept}}), progress=False)


def test_a_dense_weight_is_freed_as_soon_as_its_layer_is_coded(monkeypatch):
    """Compression holds one dense copy of the model at most, and less as it goes: when the next
    layer is fitted, the tied embedding's dense table (both its roles) is already gone."""
    import gc
    import sys
    import weakref

    compress_module = sys.modules["vqcompress.compress"]  # the package's ``compress`` is the function

    model = _TiedLM().eval()
    table = weakref.ref(model.embed.weight)
    alive_when_fitting = []
    fit_run = compress_module.fit_run

    def watching(run, *args, **kwargs):
        gc.collect()
        alive_when_fitting.append((run[0].name, table() is not None))
        return fit_run(run, *args, **kwargs)

    monkeypatch.setattr(compress_module, "fit_run", watching)
    vqc.compress(model, "kmeans", 3, progress=False, scale="row")
    assert alive_when_fitting == [("embed", True), ("mix", False)]


class _TiedCausalLM(_TiedLM):
    def get_output_embeddings(self) -> nn.Module:  # as transformers models name their output head
        return self.head


@pytest.mark.parametrize("budget", [PerLayer(3), ModelAverage(6)])
def test_a_tied_output_head_weighs_rows_by_predicted_probability_too(monkeypatch, budget):
    """A tied table's row errors count half by how often the calibration text uses each token and
    half by how much probability the uncompressed model gives it (its logit's noise costs that).
    Under a model average the allocation's statistics pass measures both (no pass of its own)."""
    import sys

    from vqcompress.finetune import Task

    compress_module = sys.modules["vqcompress.compress"]
    torch.manual_seed(0)
    model = _TiedCausalLM().eval()
    counts = torch.zeros(512, dtype=torch.int64)
    counts[[7, 100, 300]] = torch.tensor([50, 40, 30])
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    task = Task(forward=lambda m, batch: m(batch), loss=lambda s, t, batch: (s - t).square().mean())
    data = TrainingData(task, lambda step: ids, calibration_batches=2, token_counts=counts)
    seen, fit_run = {}, compress_module.fit_run
    monkeypatch.setattr(compress_module, "fit_run", lambda run, seed, statistics=None, rotations=None: (
        seen.update(statistics or {}), fit_run(run, seed, statistics, rotations))[1])
    with torch.no_grad():
        predicted = torch.softmax(model(ids), -1).reshape(-1, 512).mean(0)
    if isinstance(budget, ModelAverage):
        monkeypatch.setattr(compress_module, "predicted_probabilities", None)  # its own pass would fail
    vqc.compress(model, "kmeans", budget, data, progress=False, scale="row")
    assert torch.allclose(seen["embed"].row_weight, (counts / counts.sum() + predicted) / 2, atol=1e-6)


def test_a_tied_table_on_a_fixed_grid_runs_no_predicted_token_pass(monkeypatch):
    """rtn's grid ignores row weights, so a tied table pinned to it keeping no rows costs no pass
    of the model and its head over the calibration batches (Gemma's took 25 minutes)."""
    import sys

    from vqcompress.finetune import Task

    compress_module = sys.modules["vqcompress.compress"]
    model = _TiedCausalLM().eval()
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    task = Task(forward=lambda m, batch: m(batch), loss=lambda s, t, batch: (s - t).square().mean())
    data = TrainingData(task, lambda step: ids, calibration_batches=2)
    monkeypatch.setattr(compress_module, "predicted_probabilities", None)  # a pass would fail
    vqc.compress(model, "kmeans", PerLayer(3), data, progress=False, scale="row",
                 plan=vqc.Plan(by_name={"embed": {"method": "rtn", "bits": 8}}))
    assert model.embed.weight_code.recipe["method"] == "rtn"


def test_kept_rows_weigh_nothing_in_the_fit_of_the_codebook_the_other_rows_use():
    """The rows an embedding keeps apart are chosen before the fit (most weighted energy) and left
    out of it: the codebook serves the rows that use it, whose error is then lower than when the
    kept rows, far heavier, pulled the codewords their way."""
    from vqcompress.calibrate import InputStatistics
    from vqcompress.compress import _job, fit_layer

    torch.manual_seed(0)
    table = torch.nn.Embedding(512, 16)
    with torch.no_grad():
        table.weight[:32] = 4 * torch.randn(32, 16).sign() + torch.randn(32, 16)  # heavy rows of another shape
    used = torch.cat([torch.full((32,), 100.0), torch.ones(480)])
    inputs = InputStatistics(row_weight=used / used.sum())
    others = torch.arange(32, 512)

    def other_rows_error(kept: int) -> float:
        code = fit_layer(_job("table", table, {"method": "kmeans", "dim": 4, "k": 16, "keep_rows": kept}, None), 0, inputs)
        return float((code.decode()[others] - table.weight.detach()[others]).square().sum())

    with_kept = fit_layer(_job("table", table, {"method": "kmeans", "dim": 4, "k": 16, "keep_rows": 32}, None), 0, inputs)
    assert with_kept.kept_row_numbers().tolist() == list(range(32))
    assert other_rows_error(32) < 0.9 * other_rows_error(0)
