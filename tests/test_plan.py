"""Plans pick layers and specs (global → type → name, None skips); compress obeys them and fails early."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vqcompress as vqc
from vqcompress import Plan, VQCError
from vqcompress.compress import compress_with_summary
from vqcompress.layers import CodedEmbedding, CodedLayer, CodedLinear
from vqcompress.methods.kmeans import dim_and_k_for_bits
from vqcompress.plan import LeftDense, left_dense_lines


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(128, 64)                                              # 8192 weights
        self.block = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))  # 8192 each
        self.norm = nn.LayerNorm(64)
        self.conv = nn.Conv1d(64, 64, 1)                                                # 4096 = min_weights
        self.tiny = nn.Linear(64, 8)                                                    # 512 < min_weights

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.block(self.embed(ids)))
        return self.tiny(self.conv(h.transpose(1, 2)).transpose(1, 2))


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


GLOBAL = {"method": "kmeans", "bits": 2}


def specs(plan: Plan, model: nn.Module, spec: dict = GLOBAL) -> dict[str, dict]:
    return {name: s for name, _, s in plan.resolve(model, spec)}


def test_default_plan(net):
    got = specs(Plan(), net)
    assert list(got) == ["embed", "block.0", "block.2", "conv"]  # model order; norm unsupported, tiny too small
    assert all(s == GLOBAL for s in got.values())


def test_type_then_names_merge_and_later_wins(net):
    plan = Plan(by_type={"Linear": {"bits": 4, "dim": 2}, "Conv1d": {"k": 16}},
                by_name={r"block\..*": {"bits": 3}, r"block\.0": {"bits": 1, "scale": "row"}})
    got = specs(plan, net)
    assert got["embed"] == GLOBAL
    assert got["conv"] == {"method": "kmeans", "bits": 2, "k": 16}
    assert got["block.2"] == {"method": "kmeans", "bits": 3, "dim": 2}
    assert got["block.0"] == {"method": "kmeans", "bits": 1, "dim": 2, "scale": "row"}
    # the same patterns in the other order: the later one wins
    plan = Plan(by_name={r"block\.0": {"bits": 1}, r"block\..*": {"bits": 3}})
    assert specs(plan, net)["block.0"]["bits"] == 3
    # resolving does not mutate the specs it merges
    assert plan.by_name == {r"block\.0": {"bits": 1}, r"block\..*": {"bits": 3}}


def test_name_patterns_must_match_fully(net):
    got = specs(Plan(by_name={r"block\.0": {"bits": 1}}), net)
    assert got["block.0"] == {**GLOBAL, "bits": 1} and got["block.2"] == GLOBAL


@pytest.mark.parametrize("pattern", [r"lock\.0", "block", "embed_tokens"])
def test_a_pattern_that_names_no_layer_is_refused_with_how_to_match(net, pattern):
    """A part of a name ("embed" for model.embed_tokens) would otherwise be silently ignored."""
    with pytest.raises(VQCError, match="names no layer: a pattern must match a whole name"):
        specs(Plan(by_name={pattern: None}), net)


@pytest.mark.parametrize("plan, skipped", [
    (Plan(by_type={"Embedding": None}), {"embed"}),
    (Plan(by_type={"Linear": None}), {"block.0", "block.2"}),
    (Plan(by_name={r"block\.2": None}), {"block.2"}),
    (Plan(by_type={"Linear": {"bits": 4}}, by_name={r"block\.0": None}), {"block.0"}),
    (Plan(by_name={r"block\..*": {"bits": 4}, r"block\.2": None}), {"block.2"}),
    (Plan(by_name={r"block\.2": None, r"block\..*": {"bits": 4}}), {"block.2"}),  # None at any level skips
    (Plan(by_type={"Conv1d": None}, by_name={"conv": {"bits": 4}}), {"conv"}),     # (module docstring)
])
def test_none_skips_at_every_level(net, plan, skipped):
    got = specs(plan, net)
    assert set(got) == {"embed", "block.0", "block.2", "conv"} - skipped


def test_tiny_layers_skipped_unless_named(net):
    assert "tiny" not in specs(Plan(), net)
    got = specs(Plan(by_name={"tiny": {"dim": 2, "k": 16}}), net)
    assert got["tiny"] == {**GLOBAL, "dim": 2, "k": 16}
    assert "tiny" not in specs(Plan(by_name={"tiny": None}), net)
    assert "tiny" in specs(Plan(min_weights=512), net)
    assert "tiny" not in specs(Plan(min_weights=513), net)
    assert "conv" not in specs(Plan(min_weights=4097), net)


def test_named_unsupported_layer_raises(net):
    with pytest.raises(VQCError, match="norm.*LayerNorm"):
        Plan(by_name={"norm": {"bits": 2}}).resolve(net, GLOBAL)
    with pytest.raises(VQCError, match="norm"):
        vqc.compress(net, "kmeans", bits=2, plan=Plan(by_name={"norm": {"bits": 2}}), progress=False)
    assert "norm" not in specs(Plan(by_name={"norm": None}), net)  # asking to skip it is fine
    assert "block.1" not in specs(Plan(by_name={r"block\.[01]": {"bits": 2}}), net)  # ReLU next to a Linear


def test_compress_follows_the_plan(net):
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        before = net(ids)
    plan = Plan(by_type={"Embedding": None},
                by_name={r"block\.2": {"method": "rtn", "bits": 4, "group_size": 32}, "tiny": {"dim": 2, "k": 16}})
    model = vqc.compress(net, "kmeans", bits=2, plan=plan, progress=False)
    assert model is net  # in place
    assert type(model.embed) is nn.Embedding and not isinstance(model.embed, CodedEmbedding)
    assert type(model.norm) is nn.LayerNorm
    assert isinstance(model.block[1], nn.ReLU)
    coded = {name for name, m in model.named_modules() if isinstance(m, CodedLayer)}
    assert coded == {"block.0", "block.2", "conv", "tiny"}
    assert model.block[0].weight_code.recipe["method"] == "kmeans"
    layout = model.block[0].weight_code.layout
    assert (layout.dim, layout.k) == dim_and_k_for_bits(2, (128, 64))  # the budget rule picks (d, k)
    assert model.block[2].weight_code.recipe == {"method": "rtn", "bits": 4, "group_size": 32}
    assert model.block[2].weight_code.layout.scale_group == 32
    assert model.tiny.weight_code.layout.k == 16
    assert not model.block[0].training  # keeps eval mode
    with torch.no_grad():
        after = model(ids)
    assert torch.isfinite(after).all()
    assert (after - before).norm() < 0.5 * before.norm()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_compress_refuses_non_finite_weights_before_any_work(net, bad):
    net.conv.weight.data[3, 1, 0] = bad
    with pytest.raises(VQCError, match="conv"):
        vqc.compress(net, "kmeans", bits=2, progress=False)
    assert not any(isinstance(m, CodedLayer) for m in net.modules())  # nothing was replaced


def test_compress_checks_every_budget_before_any_work(net):
    with pytest.raises(VQCError, match="tiny"):  # the last layer planned asks for 256 codewords > 128 sub-vectors
        vqc.compress(net, "kmeans", bits=2, plan=Plan(by_name={"tiny": {"dim": 4, "k": 256}}), progress=False)
    assert not any(isinstance(m, CodedLayer) for m in net.modules())


def test_compress_raises_when_nothing_is_selected(net):
    with pytest.raises(VQCError, match="no layer"):
        vqc.compress(net, "kmeans", bits=2, plan=Plan(by_type={"Linear": None, "Embedding": None, "Conv1d": None}),
                     progress=False)
    with pytest.raises(VQCError, match="no layer"):
        vqc.compress(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)), "kmeans", bits=2, progress=False)


def test_compress_other_errors(net):
    with pytest.raises(VQCError):
        vqc.compress(net, "kmeans", bits=2, calibration=[torch.zeros(1)], progress=False)
    with pytest.raises(VQCError, match="nope"):
        vqc.compress(net, "nope", bits=2, progress=False)
    with pytest.raises(VQCError, match="embed"):  # the error names the first layer that cannot meet it
        vqc.compress(net, "kmeans", bits=0.05, progress=False)


def test_compress_a_bare_linear():
    torch.manual_seed(0)
    dense = nn.Linear(64, 128)
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = dense(x)
    layer = vqc.compress(dense, "kmeans", bits=4, progress=False)
    assert type(layer) is CodedLinear and isinstance(layer, nn.Linear)
    with torch.no_grad():
        got = layer(x)
    assert (got - expected).norm() < 0.2 * expected.norm()


# -- what is left dense, and why ------------------------------------------------------------------

def test_what_is_left_dense_is_listed_with_its_reason_and_share(net):
    net.limited = nn.Embedding(64, 64, max_norm=1.0)  # renormalises its weight in place: not codable
    _, summary = compress_with_summary(net, "kmeans", bits=2, plan=Plan(by_type={"Embedding": None}), progress=False)
    total = sum(p.numel() for p in Net().parameters()) + 64 * 64
    assert [(e.name, e.weights, e.reason) for e in summary.left_dense] == [
        ("embed", 8192, "skipped by the plan"), ("tiny", 512, "too small (under 4,096 weights)"),
        ("limited", 4096, "unsupported: an Embedding with max_norm rewrites its weight")]
    assert summary.left_dense[0].share == pytest.approx(8192 / total)
    lines = left_dense_lines(summary.left_dense)
    assert lines[0] == f"left dense: 3 tensor(s), {100 * (8192 + 512 + 4096) / total:.2f}% of the weights (biases and norms aside):"
    assert lines[2] == f"  tiny ({100 * 512 / total:.2f}%): too small (under 4,096 weights)"


def test_alike_names_fold_into_one_line():
    entries = [LeftDense(f"blocks.{i}.proj", 100, 0.01, "too small (under 4,096 weights)") for i in range(12)]
    assert left_dense_lines(entries)[1:] == ["  blocks.#.proj ×12 (12.00%): too small (under 4,096 weights)"]
    assert left_dense_lines([]) == []


def small_first() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 64))  # 48 weights of 3 inputs, then 1,024


def test_a_layer_its_method_cannot_take_is_left_dense_unless_asked_for_by_name():
    """At 2 bits no codebook of a 3-input, 48-weight layer costs under a quarter of its index bits:
    kmeans cannot take it. Planned by default it stays dense, listed; named, the run stops."""
    model, summary = compress_with_summary(small_first(), "kmeans", bits=2, plan=Plan(min_weights=0), progress=False)
    assert type(model[0]) is nn.Linear and isinstance(model[2], CodedLinear)
    [entry] = summary.left_dense
    assert (entry.name, entry.weights) == ("0", 48) and entry.reason.startswith("kmeans cannot take it: no codebook")
    with pytest.raises(VQCError, match="^0: no codebook"):
        vqc.compress(small_first(), "kmeans", bits=2, plan=Plan(min_weights=0, by_name={"0": {}}), progress=False)
    assert not any(isinstance(m, CodedLayer) for m in model[0].modules())


def test_when_no_layer_can_be_compressed_the_reasons_are_said():
    with pytest.raises(VQCError, match="no layer can be compressed: 0: kmeans cannot take it: no codebook"):
        vqc.compress(small_first(), "kmeans", bits=0.05, plan=Plan(min_weights=0), progress=False)


def test_tensors_held_by_other_modules_are_planned_under_their_holders_names():
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(64, 4), nn.LSTM(64, 64))
    assert list(specs(Plan(), model)) == ["0.in_proj_weight_coded", "0.out_proj", "1.weight_ih_l0_coded",
                                          "1.weight_hh_l0_coded"]
    assert "1.weight_ih_l0_coded" not in specs(Plan(by_name={r"1\.weight_ih.*": None}), model)
    assert "in_proj_weight" in model[0]._parameters  # planning moves nothing
