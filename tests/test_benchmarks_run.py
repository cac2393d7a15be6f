"""The MiniLM bench's own logic: what reaches vqcompress.compress, --only selection, row merging."""

from benchmarks.run import CONFIGS, compress_options, label, merge_rows, selected


def test_calibrated_runs_and_bench_keys_stripped():
    assert compress_options("jlcm", {"bits": 2.1, "gradient": "soft"}) == ({"bits": 2.1, "gradient": "soft"}, True)
    assert compress_options("kmeans", {"bits": 2.1, "scale": "row", "calib": True}) == (
        {"bits": 2.1, "scale": "row"}, True)
    assert compress_options("kmeans", {"bits": 2, "finetune_steps": 300}) == ({"bits": 2, "finetune_steps": 300}, True)
    assert compress_options("kmeans", {"bits": 2, "scale": "row"}) == ({"bits": 2, "scale": "row"}, False)
    assert compress_options("kmeans", {"bits": 2, "calib": False}) == ({"bits": 2}, False)


def test_labels_are_unique_and_only_selects_by_substring():
    labels = [label(c) for c in CONFIGS]
    assert len(set(labels)) == len(labels)
    assert [label(c) for c in selected(CONFIGS, ["jlcm bits=2.1 g"])] == [
        "jlcm bits=2.1 gradient=soft", "jlcm bits=2.1 gradient=ste", "jlcm bits=2.1 grouping=none"]
    assert [label(c) for c in selected(CONFIGS, ["coremltools-skm", "group_size=384"])] == [
        "coremltools-skm n_bits=2", "coremltools-skm n_bits=3", "hqq nbits=2 group_size=384",
        "hqq nbits=3 group_size=384"]
    assert selected(CONFIGS, ["no such row"]) == []


def row(method: str, settings: dict, value: float) -> dict:
    return {"method": method, "settings": settings, "cosine": value}


def test_merge_replaces_same_config_keeps_the_rest_in_config_order():
    configs = [{"method": "fp32", "settings": {}}, {"method": "jlcm", "settings": {"bits": 2.1}},
               {"method": "kmeans", "settings": {"bits": 2.1, "calib": True}}]
    earlier = [row("retired", {"bits": 9}, 0.1), row("kmeans", {"bits": 2.1, "calib": True}, 0.5),
               row("fp32", {}, 1.0), row("jlcm", {"bits": 2.1}, 0.6)]
    merged = merge_rows(earlier, [row("jlcm", {"bits": 2.1}, 0.7)], configs)
    assert merged == [row("fp32", {}, 1.0), row("jlcm", {"bits": 2.1}, 0.7),
                      row("kmeans", {"bits": 2.1, "calib": True}, 0.5), row("retired", {"bits": 9}, 0.1)]
    added = merge_rows(merged[:1], [row("kmeans", {"bits": 2.1, "calib": True}, 0.4)], configs)
    assert added == [row("fp32", {}, 1.0), row("kmeans", {"bits": 2.1, "calib": True}, 0.4)]
    # settings differing only in a bench key are different configurations
    assert len(merge_rows([row("kmeans", {"bits": 2.1}, 0.3)], [row("kmeans", {"bits": 2.1, "calib": True}, 0.4)],
                          configs)) == 2
