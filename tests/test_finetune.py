"""The fine-tuning engine: it lowers the distillation loss, learns assignments, and resumes exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vqcompress as vqc
from vqcompress.errors import VQCError
from vqcompress.finetune import GUARD_BATCHES, classification_task, finetune, relative_error
from vqcompress.layers import iter_coded


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.LayerNorm(128), nn.Linear(128, 10)).eval()


def batch_at(step: int) -> tuple[torch.Tensor, None]:
    return torch.randn(32, 64, generator=torch.Generator().manual_seed(step)), None


def distillation_loss(student: nn.Module, teacher: nn.Module) -> float:
    task = classification_task()
    with torch.no_grad():
        return float(sum(task.loss(student(x), teacher(x), (x, None)) for x, _ in map(batch_at, range(1000, 1010))))


def compressed(teacher: nn.Module) -> nn.Module:
    """1 bit per index: the first layer with a large codebook (much to gain), the head a small one."""
    plan = vqc.Plan(by_name={"0": {"dim": 8, "k": 256}}, min_weights=0)
    return vqc.compress(copy.deepcopy(teacher), "kmeans", bits=1, plan=plan, progress=False)


def test_a_run_that_raises_the_loss_is_undone(capsys):
    teacher = mlp()
    student = compressed(teacher)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    finetune(student, teacher, classification_task(), batch_at, steps=10, lr=10.0, learn_assignments=True, progress=False)
    after = student.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert "raised the loss on its first batches" in capsys.readouterr().err


@pytest.mark.parametrize("learn_assignments, assignments", [(False, "ste"), (True, "ste"), (True, "soft")])
def test_fine_tuning_lowers_the_loss_and_keeps_the_format(learn_assignments, assignments):
    teacher = mlp()
    student = compressed(teacher)
    before = distillation_loss(student, teacher)
    sizes = {n: layer.weight_code.nbits() for n, layer in iter_coded(student)}
    finetune(student, teacher, classification_task(), batch_at, steps=100, lr=3e-3,
             learn_assignments=learn_assignments, assignments=assignments, reassign_every=20, progress=False)
    assert distillation_loss(student, teacher) < 0.8 * before
    assert {n: layer.weight_code.nbits() for n, layer in iter_coded(student)} == sizes
    codes = [layer.weight_code for _, layer in iter_coded(student)]
    assert all(code.codebook.dtype == torch.float16 and code.assigner is None for code in codes)
    assert not any("latent" in code._parameters for code in codes)


def scrambled(student: nn.Module) -> nn.Module:
    """Its first layer's codes shuffled: a start any nearest-codeword move improves on."""
    code = next(iter_coded(student))[1].weight_code
    code.codes = code.codes[torch.randperm(len(code.codes), generator=torch.Generator().manual_seed(0))]
    return student


@pytest.mark.parametrize("assignments", ["ste", "soft"])
def test_learned_assignments_move(assignments):
    teacher = mlp()
    student = scrambled(compressed(teacher))
    codes_before = [layer.weight_code.codes.clone() for _, layer in iter_coded(student)]
    finetune(student, teacher, classification_task(), batch_at, steps=40, lr=3e-3, learn_assignments=True,
             assignments=assignments, reassign_every=10, progress=False)
    assert any(not torch.equal(a, layer.weight_code.codes) for a, (_, layer) in zip(codes_before, iter_coded(student)))


def test_a_reassignment_that_raises_the_loss_is_not_kept(monkeypatch):
    teacher = mlp()
    student = compressed(teacher)
    codes_before = [layer.weight_code.codes.clone() for _, layer in iter_coded(student)]
    moves = []

    def harmful(code, latent):  # every code to the first codeword
        moves.append(code)
        code.codes = torch.zeros_like(code.codes)

    monkeypatch.setattr("vqcompress.coded.CodedWeight.reassign", harmful)
    finetune(student, teacher, classification_task(), batch_at, steps=40, lr=1e-4, learn_assignments=True,
             reassign_every=10, progress=False)
    assert moves and all(torch.equal(a, layer.weight_code.codes) for a, (_, layer) in zip(codes_before, iter_coded(student)))


def test_soft_assignments_anneal_then_freeze():
    """The temperature falls step by step to the freeze (80% of the steps), then the codes stay put."""
    teacher = mlp()
    student = compressed(teacher)
    code = next(iter_coded(student))[1].weight_code
    seen = []

    def batches(step: int):
        seen.append((code.assigner and code.assigner.temperature, code.codes.clone()))
        return batch_at(step)

    finetune(student, teacher, classification_task(), batches, steps=20, lr=3e-3, learn_assignments=True,
             assignments="soft", progress=False)
    seen = seen[GUARD_BATCHES:]  # the batches the run is judged on, drawn before it starts
    temperatures = [t for t, _ in seen]
    assert all(t is not None for t in temperatures[:16]) and all(t is None for t in temperatures[16:])
    assert temperatures[0] == 1.0 and all(a > b for a, b in zip(temperatures[:15], temperatures[1:16]))
    assert all(torch.equal(codes, seen[16][1]) for _, codes in seen[16:]) and torch.equal(code.codes, seen[16][1])


def test_latent_weights_start_from_the_teachers_dense_weights():
    """The latent weight keeps where each sub-vector lies inside its cell: the teacher's weight, not the decoded one."""
    teacher = mlp()
    student = compressed(teacher)
    seen = {}

    def batches(step: int):
        for name, layer in iter_coded(student):
            if layer.weight_code.assigner is not None:  # training (the guard's batches come before it)
                seen.setdefault(name, layer.weight_code.assigner.latent.detach().clone())
        return batch_at(step)

    finetune(student, teacher, classification_task(), batches, steps=1, lr=1e-9, learn_assignments=True,
             progress=False)
    assert seen
    for name, latent in seen.items():
        assert torch.equal(latent, teacher.get_submodule(name).weight.detach())


@pytest.mark.parametrize("assignments", ["ste", "soft"])
def test_interrupted_run_resumes_to_the_same_weights(tmp_path, assignments):
    teacher = mlp()
    whole = finetune(compressed(teacher), teacher, classification_task(), batch_at, steps=30, lr=3e-3,
                     learn_assignments=True, assignments=assignments, reassign_every=7, progress=False)

    checkpoint = tmp_path / "run.ckpt"
    interrupted = compressed(teacher)
    calls = {"n": 0}

    def batch_then_interrupt(step: int):
        calls["n"] += 1
        if calls["n"] == 25:
            raise KeyboardInterrupt
        return batch_at(step)

    with pytest.raises(KeyboardInterrupt):
        finetune(interrupted, teacher, classification_task(), batch_then_interrupt, steps=30, lr=3e-3,
                 learn_assignments=True, assignments=assignments, reassign_every=7, checkpoint=checkpoint,
                 checkpoint_every=10, progress=False)
    assert checkpoint.exists()
    resumed = finetune(compressed(teacher), teacher, classification_task(), batch_at, steps=30, lr=3e-3,
                       learn_assignments=True, assignments=assignments, reassign_every=7, checkpoint=checkpoint, checkpoint_every=10,
                       progress=False)
    assert not checkpoint.exists()
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_needs_coded_layers_and_steps():
    teacher = mlp()
    with pytest.raises(VQCError, match="no coded layer"):
        finetune(mlp(), teacher, classification_task(), batch_at, steps=5, progress=False)
    with pytest.raises(VQCError, match="at least one step"):
        finetune(compressed(teacher), teacher, classification_task(), batch_at, steps=0, progress=False)
    with pytest.raises(VQCError, match="assignments must be one of ste, soft"):
        finetune(compressed(teacher), teacher, classification_task(), batch_at, steps=5, assignments="hard", progress=False)


def test_causal_lm_loss_by_slices_is_the_mean_kl_and_its_gradient():
    """Computed LOSS_ROWS positions at a time (memory), it is the plain batch-mean KL, gradient too."""
    import torch.nn.functional as F

    from vqcompress.finetune import LOSS_ROWS, causal_lm_task

    torch.manual_seed(0)
    student, teacher = torch.randn(2, LOSS_ROWS + 44, 50, requires_grad=True), torch.randn(2, LOSS_ROWS + 44, 50)
    sliced = causal_lm_task(temperature=2.0).loss(student, teacher, {})
    (gradient,) = torch.autograd.grad(sliced, student)
    whole = F.kl_div(F.log_softmax(student.reshape(-1, 50) / 2, -1), F.log_softmax(teacher.reshape(-1, 50) / 2, -1),
                     reduction="batchmean", log_target=True) * 4
    assert torch.allclose(sliced, whole)
    assert torch.allclose(gradient, torch.autograd.grad(whole, student)[0], atol=1e-7)


def test_a_diverging_run_stops_before_its_weights_turn_nan():
    teacher = mlp()
    with pytest.raises(VQCError, match="diverged at step 1 .* lower the learning rate"):
        finetune(compressed(teacher), teacher, classification_task(), lambda step: (batch_at(step)[0] * torch.nan, None),
                 steps=5, progress=False)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    teacher = mlp()
    checkpoint = tmp_path / "bad.ckpt"
    checkpoint.write_bytes(b"garbage")
    with pytest.raises(VQCError, match="delete it"):
        finetune(compressed(teacher), teacher, classification_task(), batch_at, steps=5, checkpoint=checkpoint,
                 progress=False)


def test_same_seed_same_weights_through_convolutions():
    """Two runs on a conv net end bit-identical (CPU conv weight gradients are not, unless asked)."""
    def conv_net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(16, 32, 3, padding=1), nn.Flatten(), nn.Linear(32 * 14 * 14, 10)).eval()

    def images(step: int):
        return torch.randn(128, 1, 28, 28, generator=torch.Generator().manual_seed(step)), None

    def run() -> dict:
        teacher = conv_net()
        student = vqc.compress(copy.deepcopy(teacher), "kmeans", bits=2, progress=False)
        finetune(student, teacher, classification_task(), images, steps=8, lr=1e-3, learn_assignments=True,
                 reassign_every=3, progress=False)
        return student.state_dict()

    first, second = run(), run()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.are_deterministic_algorithms_enabled()  # the global setting is left as it was


def test_causal_lm_sensitivities_probe_a_short_slice():
    from vqcompress.finetune import PROBE_TOKENS, causal_lm_task

    batch = {"input_ids": torch.zeros(4, 512, dtype=torch.int64)}
    assert causal_lm_task().probe(batch)["input_ids"].shape == (1, PROBE_TOKENS)


def test_a_block_error_counts_each_channel_against_its_own_energy():
    """A residual stream with one huge channel: an error in a small channel counts as much as the
    same relative error in the huge one, and padding positions do not count at all."""
    target = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0)) * torch.tensor([100.0, 1.0, 1.0])
    positions = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    small = target.clone()
    small[..., 1] *= 1.1
    huge = target.clone()
    huge[..., 0] *= 1.1
    assert relative_error([small], [target], [positions]) == pytest.approx(0.01 / 3, rel=1e-5)
    assert relative_error([huge], [target], [positions]) == pytest.approx(0.01 / 3, rel=1e-5)
    padded = small.clone()
    padded[1, 4] = 1e6
    assert relative_error([padded], [target], [positions]) == pytest.approx(0.01 / 3, rel=1e-5)
