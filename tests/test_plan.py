"""Plans pick layers and specs (global → type → name, None skips); compress obeys them and fails early."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vqcompress as vqc
from vqcompress import Plan, VQCError
from vqcompress.layers import CodedEmbedding, CodedLayer, CodedLinear
from vqcompress.methods.kmeans import dim_and_k_for_bits


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
