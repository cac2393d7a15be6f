"""The fashion bench's bookkeeping: which earlier row stands for which configuration."""

from __future__ import annotations

from benchmarks.fashion import accuracy_configs, same_config, selected


def test_rows_from_before_soft_assignments_stand_only_for_straight_through_configs():
    old_row = {"model": "fashion-cnn", "budget": "≤ 1.6", "method": "vqdnn", "steps": 4000, "bits": 1.5, "accuracy": 92.0}
    configs = [c for c in accuracy_configs() if c["model"] == "fashion-cnn" and c["budget"] == "≤ 1.6"
               and c["method"] == "vqdnn"]
    assert [c.get("assignments") for c in configs] == [None, "soft"]
    assert [same_config(old_row, c) for c in configs] == [True, False]
    assert same_config({**old_row, "assignments": "soft"}, configs[1])


def test_every_configuration_is_distinct():
    configs = accuracy_configs()
    assert all(not same_config(a, b) for i, a in enumerate(configs) for b in configs[i + 1:])


def test_selection_by_model_and_budget():
    chosen = selected(["fashion-cnn"], ["fp32", "≤ 1.6"])
    assert {(c["model"], c["budget"]) for c in chosen} == {("fashion-cnn", "fp32"), ("fashion-cnn", "≤ 1.6")}
    assert len(chosen) == 6 and selected(None, None) == accuracy_configs()
