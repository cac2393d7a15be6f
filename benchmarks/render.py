"""docs/benchmarks.md and the rate–distortion plot, from benchmarks/results/*.json alone.

    .venv/bin/python -m benchmarks.render     # re-render without re-measuring

Rendering only reads the stored results, so the docs always show numbers that were measured
together in one `make bench` run, never a mix of runs.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "minilm.json"
FASHION = ROOT / "benchmarks" / "results" / "fashion.json"
UNIVERSAL = ROOT / "benchmarks" / "results" / "universal.json"
GEMMA = ROOT / "benchmarks" / "results" / "gemma.json"
GEMMA_PARTS = ROOT / "benchmarks" / "results" / "gemma-parts.json"
MATRIX = ROOT / "benchmarks" / "results" / "matrix.json"
PRETRAINED = ROOT / "benchmarks" / "results" / "pretrained.json"
INCOHERENCE = ROOT / "benchmarks" / "results" / "incoherence.json"
LLAMACPP = ROOT / "benchmarks" / "results" / "llamacpp.json"
FUZZ = ROOT / "benchmarks" / "results" / "fuzz.json"
SPEED_RUNS = "speed*.json"  # speed.json (make bench-speed), and runs with other settings beside it
SPEED_COLUMNS = ("dense", "default path", "lut path", "kernel, table", "kernel, gather", "kernel, decode-then-multiply",
                 "decode path",
                 "torch table product")
FASHION_TARGETS = {"≤ 1.6": 0.5, "≤ 1.0": 1.5}  # points of accuracy a budget may lose against fp32
DOCS = ROOT / "docs"
PLOT = "minilm_rate_distortion.png"
SPEARMAN = ("lee", "wordsim353", "simlex999")
NAMES = {"fp32": "fp32 (reference)", "kmeans": "vqcompress kmeans", "rtn": "vqcompress rtn", "vq4all": "vqcompress vq4all",
         "jlcm": "vqcompress jlcm", "coremltools": "coremltools PTP", "coremltools-skm": "coremltools SKM",
         "hqq": "HQQ", "qswd": "vqcompress qswd", "qswd calibrated": "vqcompress qswd, calibrated",
         "qswd fine-tuned": "vqcompress qswd, calibrated + fine-tuned"}
RD_PLOT = "rate_distortion.png"
RD_METHODS = ("qswd", "kmeans", "jlcm", "rtn")  # the rate–distortion comparison, data-free rows but jlcm
RD_QSWD_VARIANTS = ("qswd calibrated", "qswd fine-tuned")  # lines of qswd's whole pipeline
RD_TOLERANCE = 0.01  # qswd at ≥ 4 bits: the best, or within 1% of the best at no more bits (5% slack)


def line_name(row: dict) -> str:
    """One plotted line per method, with kmeans' row scaling told apart from plain kmeans."""
    settings = row["settings"]
    scale, steps, calibrated = settings.get("scale"), settings.get("finetune_steps"), settings.get("calib")
    extras = {key: settings[key] for key in ("gradient", "grouping") if key in settings}
    return (NAMES[row["method"]] + (f" scale={scale}" if scale else "") + (" calibrated" if calibrated else "")
            + "".join(f" {k}={v}" for k, v in extras.items()) + (" + fine-tuning" if steps else ""))


def settings_text(row: dict) -> str:
    parts = [f"{k}={v}" for k, v in row["settings"].items()]
    granularity = row.get("details", {}).get("granularity")
    return ", ".join(parts + ([granularity] if granularity else [])) or "—"


def relative_spearman(row: dict, fp32: dict) -> float:
    """Mean of the three Spearman figures, each as a fraction of fp32's: 1.0 = nothing lost."""
    return sum(row[m] / fp32[m] for m in SPEARMAN) / len(SPEARMAN)


def number(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def results_table(rows: list[dict]) -> list[str]:
    lines = ["| method | settings | bits/w coded | bits/w model | file MiB | Lee | WordSim353 | SimLex999 "
             "| cosine | compress s | peak MiB |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        file_mib = None if r["file_bytes"] is None else r["file_bytes"] / 2**20
        cells = [NAMES[r["method"]], settings_text(r), number(r["coded_bits_per_weight"], 3),
                 number(r["model_bits_per_weight"], 3), number(file_mib, 2), number(r["lee"], 3),
                 number(r["wordsim353"], 3), number(r["simlex999"], 3), number(r["cosine"], 4),
                 number(r["compress_seconds"], 1), number(r["peak_memory_mib"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def timing_section(timing: dict) -> list[str]:
    target, runs = timing["target"], timing["runs"]
    limit_mib = target["peak_memory_bytes"] / 2**20
    seconds, peak = timing["median_seconds"], timing["max_peak_memory_mib"]
    lines = [f"Target: the whole command ≤ {target['seconds']} s (median of {len(runs)} runs) on {target['cores']} "
             f"cores with peak memory ≤ {target['peak_memory_bytes'] / 1e9:g} GB ({limit_mib:.0f} MiB). "
             f"Measured on {timing['machine']['cores']} cores: time **{verdict(seconds, target['seconds'], 's')}**, "
             f"memory **{verdict(peak, limit_mib, 'MiB')}**.", "",
             f"`{timing['command']}` (model load and file write included; peak = the process's max RSS)", "",
             "| run | seconds | peak MiB |", "|---|--:|--:|"]
    lines += [f"| {i} | {r['seconds']:.1f} | {r['peak_memory_mib']:.0f} |" for i, r in enumerate(runs, 1)]
    lines.append(f"| **median / max** | **{seconds:.1f}** | **{peak:.0f}** |")
    return lines


def verdict(value: float, limit: float, unit: str) -> str:
    """Met or not, with both numbers, so a reader never has to trust the word alone."""
    if value <= limit:
        return f"met ({value:.1f} ≤ {limit:.0f} {unit})"
    return f"not met ({value:.1f} > {limit:.0f} {unit})"


def machine_lines(result: dict) -> list[str]:
    """Every distinct machine the rows and the timing report (one, unless something is wrong)."""
    machines = {json.dumps(r["machine"], sort_keys=True) for r in [*result["rows"], result["timing"]]}
    return [f"- {m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}, {m['os']}"
            for m in map(json.loads, sorted(machines))]


def finetune_note(rows: list[dict]) -> str:
    if not any(r["settings"].get("finetune_steps") for r in rows):
        return ""
    return (" `finetune_steps` adds the fine-tuning engine (distillation from fp32 on Lee background sentences, "
            "batches of 32; codebooks, norms and biases train, assignments stay), its time included in *compress s*.")


def notes(rows: list[dict]) -> list[str]:
    """How each method's bits were counted, with the layer counts this run measured."""
    layers = {r["method"]: r["layers"] for r in rows}
    parameters = rows[0]["parameters"]
    return [
        f"- **Whole-model bits/weight** divide every stored bit by all {parameters:,} parameters of the model, "
        "so layers left dense (LayerNorms, biases, small tensors) count too. **Coded** counts only the compressed "
        "layers and everything they store (codes, codebooks / LUTs, scales, offsets).",
        f"- **vqcompress** ({layers['kmeans']} layers: word and position embeddings and every Linear): both figures "
        "come from the written .vqc file (`vqc inspect`), which also stores every dense tensor; *file MiB* is that "
        "file's size. Quality is measured on the model reloaded from the file (decoded to dense layers once: "
        "the same weights). `rtn` is per-group round-to-nearest with an fp16 scale and offset per group "
        "(b + 0.5 bits); `scale=row` divides each row by its fp16 RMS before k-means." + finetune_note(rows),
        f"- **coremltools PostTrainingPalettizer** ({layers['coremltools']} layers, the same as ours), data-free "
        "k-means, one LUT per tensor (per_tensor): coded bits = n_bits per weight + the LUT's 2^n_bits fp16 entries, "
        "read from the LUT coremltools attaches. It writes the palettized values back into fp32 weights; quality is "
        "of those.",
        f"- **HQQ** ({layers['hqq']} Linear layers; HQQ does not quantize embeddings, so the word embeddings, about "
        "half of MiniLM's parameters, stay fp32 and dominate its whole-model figure): group 64 along the inputs, "
        "scale and zero per group kept in fp32 (its compute dtype on CPU), so b + 1 bits coded (3-bit codes are "
        "packed ten to a 32-bit word: 3.2 bits).",
        "- For the peers, whole-model bits/weight = (the peer's compressed bits + 32 × every parameter it left "
        "dense) / all parameters; they write no file here, so *file MiB* is empty. fp32's file is the shipped "
        "model.safetensors.",
        "- **cosine**: mean cosine between the row's and fp32's sentence embeddings of 256 held-out sentences "
        "(movie reviews). Lee, WordSim353, SimLex999: Spearman against human scores (suite `minilm`).",
        "- **compress s**: the compression call only (for ours without writing the file). **peak MiB**: the "
        "configuration's own process (fresh per row), its max RSS from start through compression and file "
        "write, before the evaluation loads the fp32 reference; it includes loading the fp32 model.",
    ]


def fashion_method(row: dict) -> str:
    """The method, and how it learned assignments where it did so by soft assignment."""
    return row["method"] + (" (soft assignments)" if row.get("assignments") == "soft" else "")


def zoo_label(row: dict) -> str:
    return row.get("zoo") or "earlier"


def fashion_order(row: dict) -> tuple:
    """Model, then build (the earlier one first), then budget, then method as the configurations list them."""
    budgets = ["fp32", *FASHION_TARGETS]
    methods = ["fp32", "kmeans", "vqdnn", "vqdnn (soft assignments)", "coremltools-dkm"]
    return (row["model"], row.get("zoo") is not None, zoo_label(row), budgets.index(row["budget"]),
            methods.index(fashion_method(row)), row["steps"])


def fashion_accuracy(result: dict) -> list[str]:
    """Every row against the fp32 accuracy of the same zoo build, and the targets per build."""
    rows = sorted(result["rows"], key=fashion_order)
    fp32 = {(r["model"], zoo_label(r)): r["accuracy"] for r in rows if r["method"] == "fp32"}
    lines = ["| model | zoo build | budget | method | steps | bits/w coded | bits/w model | accuracy % | vs fp32 | seconds "
             "| ran on |", "|---|---|---|---|--:|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        reference = fp32.get((r["model"], zoo_label(r)))  # a run cut short may not have it yet
        delta = "—" if reference is None else f"{r['accuracy'] - reference:+.2f}"
        lines.append(f"| {r['model']} | {zoo_label(r)} | {r['budget']} | {fashion_method(r)} | {r['steps']} "
                     f"| {r['coded_bits_per_weight']:.3f} | {r['model_bits_per_weight']:.3f} | {r['accuracy']:.2f} "
                     f"| {delta} | {number(r.get('seconds'), 0)} | {r.get('gpu') or 'CPU'} |")
    lines += ["", "Targets (accuracy within the stated points of the same build's fp32, every Conv2d and Linear "
              "coded, coded bits/w within the budget):", ""]
    for model, build in fp32:
        for budget, points in FASHION_TARGETS.items():
            ours = [r for r in rows if (r["model"], zoo_label(r), r["budget"]) == (model, build, budget)
                    and r["method"] != "coremltools-dkm"]
            if not ours:
                continue
            best = max(ours, key=lambda r: r["accuracy"])
            limit, reference = float(budget.split()[-1]), fp32[model, build]
            met = best["accuracy"] >= reference - points and best["coded_bits_per_weight"] <= limit
            lines.append(f"- {model} (build {build}) at {budget} bits/w: best is {fashion_method(best)} "
                         f"({best['steps']} steps), {best['accuracy']:.2f}% at {best['coded_bits_per_weight']:.3f} "
                         f"bits/w against fp32 {reference:.2f}% (allowed loss {points} points): "
                         f"**{'met' if met else 'not met'}**.")
    return lines


def fashion_resume(resume: dict) -> list[str]:
    scores, stop = resume["accuracy"], resume["interrupted"]
    return [f"`{resume['command']}` run once uninterrupted, and once interrupted by SIGINT after its first "
            f"checkpoint (exit code {stop['exit_code']}, output file written: {stop['file_written']}, checkpoint kept: "
            f"{stop['checkpoint_kept']}) and then run again: accuracy {scores['uninterrupted']:.2f}% uninterrupted, "
            f"{scores['resumed']:.2f}% resumed; the two files are "
            f"**{'identical (same sha256)' if resume['same_file'] else 'different'}**."]


def fashion_flops(rows: list[dict]) -> list[str]:
    lines = ["| model | method | layer | shape | k | d | form | batch | dense mult | LUT mult | mult ratio | dense adds "
             "| LUT adds | dense ms | decode ms | LUT ms |", "|---|---|---|---|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r.get('method', 'kmeans')} | {r['layer']} | {'×'.join(map(str, r['shape']))} "
                     f"| {r['k']} | {r['dim']} | {r.get('form', 'index')} "
                     f"| {r['batch']} | {r['dense_multiplies']:,} | {r['lut_multiplies']:,} | {r['multiply_ratio']:.2f} "
                     f"| {r['dense_adds']:,} | {r['lut_adds']:,} | {r['dense_ms']:.3f} | {r['decode_ms']:.3f} "
                     f"| {r['lut_ms']:.3f} |")
    return lines


def step_cost(result: dict) -> str:
    """Seconds per training step of DKM against vqdnn on fashion-cnn, per machine that ran both."""
    def per_step(rows: list[dict]) -> float:
        return sum(r["seconds"] for r in rows) / sum(r["steps"] for r in rows)

    costs = []
    for where in sorted({r.get("gpu") or "CPU" for r in result["rows"]}):
        rows = [r for r in result["rows"] if (r.get("gpu") or "CPU") == where and r["model"] == "fashion-cnn"]
        dkm = [r for r in rows if r["method"] == "coremltools-dkm"]
        ours = [r for r in rows if r["method"] == "vqdnn" and not r.get("assignments")]
        soft = [r for r in rows if r["method"] == "vqdnn" and r.get("assignments") == "soft"]
        if dkm and ours:
            costs.append(f"on fashion-cnn on the {where} a DKM step took {per_step(dkm):.3f} s, a vqdnn step "
                         f"{per_step(ours):.3f} s" + (f" (soft assignments {per_step(soft):.3f} s)" if soft else ""))
    return "; ".join(costs)


def measured_on(result: dict, part: str) -> list[str]:
    """A part re-measured apart from the rest says when."""
    when = result.get("measured", {}).get(part)
    return ["", f"(This part measured {when}, apart from the accuracy table.)"] if when and when != result["started"] else []


def fashion_markdown(result: dict) -> list[str]:
    budgets = "; ".join(f"{model}: " + ", ".join(f"{b['bits']} index bits and DKM n_bits {b['dkm'][0]} × cluster_dim "
                                               f"{b['dkm'][1]} for {name}" for name, b in per_model.items())
                        for model, per_model in result["budgets"].items())
    return [
        "## fashion-cnn and fashion-vit: every Conv2d and Linear coded", "",
        f"Measured by `make bench-fashion` (`benchmarks/fashion.py`), {result['started']} to "
        f"{max(result['measured'].values())}.", "",
        "Every Conv2d and Linear is coded. The first and the last layer "
        f"({', '.join(' / '.join(v) for v in result['edge_layers'].values())}; "
        "under 2% of the weights) get 4-bit scalar codebooks (d = 1, k = 16), counted; the others take the budget's "
        f"index bits through the budget rule ({budgets}). *bits/w coded* counts every stored bit of all coded layers "
        "(codes, codebooks, scales, gains) over their weights, read from the written .vqc file; accuracy is of the "
        "model reloaded from that file, on the 10,000 test images. Fine-tuning: "
        f"{result['steps']} steps of 128 training images, distillation from fp32 plus cross-entropy, learning rates "
        f"{result['lr']}; per-model options {result['model_options']} (`shared`: one codebook for all layers of a "
        "layout, with a per-layer gain). coremltools DKMPalettizer: the same layers, the same 4-bit first and last "
        f"layers, data and loss, {result['dkm_steps']} steps ({step_cost(result)}), one fp16 LUT per tensor.", "",
        "*zoo build* is the first 12 hex digits of the zoo checkpoint's sha256, and every row is compared with "
        "the fp32 row of its own build: `vqc zoo train` gives the same weights for the same seed on one machine, "
        "but a CPU of another family rounds differently and trains a slightly different model. *earlier* marks "
        "rows of a build trained in an earlier session, before rows recorded their build.", "",
        *fashion_accuracy(result), "",
        f"Accuracy rows ran on: {rows_machines(result['rows'])}.", "",
        "### Resume", "", *fashion_resume(result["resume"]), *measured_on(result, "resume"), "",
        "### FLOPs and time per layer: dense vs lookup table", "",
        "Analytic multiplies and adds of one call (`vqcompress.flops`), beside the measured median time "
        f"of one call on real test-image activations on {result['machine']['cpu']} ({result['machine']['cores']} "
        "cores): the dense layer, the coded layer's decode path (decode, then the dense product) and its "
        "lookup-table path. Layouts of kmeans at ≤ 1.6 bits/w. The lookup table saves multiplies only where "
        "k·d is small against the output rows; times are as measured, whichever path wins.", "",
        *fashion_flops(result["flops"]), "",
    ]


def rows_machines(rows: list[dict]) -> str:
    seen = {f"{r['machine']['cpu']}" + (f" with an {r['gpu']} (training on {r['device']})" if r.get("gpu") else "")
            for r in rows}
    return "; ".join(sorted(seen))


def quality(row: dict) -> str:
    """A row's quality against its own fp32, in the network's own terms."""
    dense, ours = row["fp32"], row["compressed"]
    if "perplexity" in ours:
        return f"perplexity {ours['perplexity']:.1f} vs {dense['perplexity']:.2f} ({ours['perplexity'] / dense['perplexity']:.2f}×)"
    if "accuracy" in ours:
        return f"accuracy {ours['accuracy']:.2f}% vs {dense['accuracy']:.2f}%"
    ratios = " / ".join(f"{100 * ours[m] / dense[m]:.1f}%" for m in SPEARMAN)
    return f"Spearman {ratios} of fp32; cosine {ours['cosine']:.3f}"


def universal_markdown(result: dict) -> list[str]:
    """The VQ4ALL section: codebooks, every network with a seen and an unseen codebook, the ROM table."""
    books, rows = result["codebooks"], result["rows"]
    lines = ["## vq4all: one universal codebook for MiniLM, Gemma-270M and fashion-cnn", "",
             "Generated from `benchmarks/results/universal.json` (`.venv/bin/python -m benchmarks.universal`). "
             "Codebooks: d = 4, k = 256 (2 bits per weight of indices), 4,096 row-normalised sub-vectors from every "
             "layer of the source networks, Gaussian KDE (Scott), codewords at the density's Lloyd centroids.", "",
             "| codebook | built from | sha256 | bytes |", "|---|---|---|--:|"]
    lines += [f"| {label} | {', '.join(b['sources'])} | `{b['sha256'][:12]}…` | {b['bytes']:,} |" for label, b in books.items()]
    lines += ["", "Each network with the codebook built from all three and with the one built without it (its weights "
              "unseen); `nearest` is the calibrated fit alone (rows over their RMS, nearest codeword under the "
              "input-weighted distance), `progressive` adds distillation with learned candidate assignments and "
              "progressive freezing (steps in brackets); `per-layer kmeans` is the first issue's method at the same "
              "d, k and row scales, each layer with its own codebook. Bits per weight are the whole model's as the "
              "file stores it, the universal codebook excluded (it is shared); the next column adds it once, "
              "amortised over the three networks.", "",
              "| network | codebook | assignment | bits/w (whole model) | with codebook / 3 | quality | seconds |",
              "|---|---|---|--:|--:|---|--:|"]
    for row in sorted(rows, key=lambda r: (r["network"], r["codebook"], r["assignment"])):
        parameters = row["total_bytes"] * 8 / row["model_bits_per_weight"]
        shared = row["universal_bytes"] * 8 / 3 / parameters
        steps = f" ({row['steps']})" if row["steps"] else ""
        steps += f", `{row['dense']}` dense".replace("|", "\\|") if row.get("dense") else ""
        lines.append(f"| {row['network']} | {row['codebook']} | {row['assignment']}{steps} | "
                     f"{row['model_bits_per_weight']:.3f} | {row['model_bits_per_weight'] + shared:.3f} | {quality(row)} | "
                     f"{row['seconds']:.0f} |")
    stored = [r for r in rows if r["codebook"] == "all three" and r["assignment"] == "nearest" and not r.get("dense")]
    if stored:
        book = books["all three"]["bytes"]
        lines += ["", "### The ROM claim: total bytes for 1, 2 and 3 models", "",
                  "Each model's bytes as its .vqc file stores them (indices, scales, everything left dense), plus "
                  "either one universal codebook file for all of them, or each layer's own fp16 codebook "
                  "(k × d × 2 bytes per coded layer, as `kmeans` stores it at the same d and k).", "",
                  "| models | with the universal codebook | with per-layer codebooks | codebook bytes: universal vs per-layer |",
                  "|---|--:|--:|--:|"]
        for n in range(1, len(stored) + 1):
            chosen = stored[:n]
            models = sum(r["total_bytes"] for r in chosen)
            per_layer = sum(r["per_layer_codebook_bytes"] for r in chosen)
            lines.append(f"| {', '.join(r['network'] for r in chosen)} | {models + book:,.0f} | {models + per_layer:,.0f} | "
                         f"{book:,} vs {per_layer:,} |")
    return lines + [""]


def _minilm_line(row: dict) -> str | None:
    """The rate–distortion line of a MiniLM row: each method's plain rows (no row scale,
    calibration or fine-tuning; jlcm as it always is), and qswd's calibrated ones (its whole
    pipeline: statistics, error feedback, block tuning) as a line of their own."""
    keys = set(row["settings"])
    if row["method"] in RD_METHODS and not keys - {"bits", "group_size"}:
        return row["method"]
    if row["method"] == "qswd" and row["settings"].get("calib") and not keys - {"bits", "calib", "tune_blocks"}:
        return "qswd calibrated"
    return None


def rd_curves(minilm: dict, fashion: dict | None) -> list[tuple[str, str, dict[str, list[tuple[float, float]]]]]:
    """(model, quality name, {line: [(bits, quality)]}) for the rate–distortion comparison:
    MiniLM by cosine at whole-model bits (``_minilm_line``), fashion-cnn's rate rows by accuracy at
    coded bits (qswd calibrated and fine-tuned as a line of its own)."""
    lines = [*RD_METHODS[:1], *RD_QSWD_VARIANTS, *RD_METHODS[1:]]
    minilm_points = {line: sorted((r["model_bits_per_weight"], r["cosine"]) for r in minilm["rows"]
                                  if _minilm_line(r) == line) for line in lines}
    curves = [("minilm", "cosine", {line: points for line, points in minilm_points.items() if points})]
    if fashion and fashion.get("rate"):
        def fashion_line(row: dict) -> str:
            return "qswd fine-tuned" if row["method"] == "qswd" and row["steps"] else row["method"]
        fashion_points = {line: sorted((r["coded_bits_per_weight"], r["accuracy"]) for r in fashion["rate"]
                                       if fashion_line(r) == line) for line in lines}
        curves.append(("fashion-cnn", "accuracy %", {line: points for line, points in fashion_points.items() if points}))
    return curves


def rd_verdicts(curve: dict[str, list[tuple[float, float]]]) -> list[str]:
    """For each point of a qswd line at ≥ 4 bits: the best point of the other methods at no more
    bits (5% slack)."""
    lines = []
    rivals = [(q, m, b) for m, points in curve.items() if not m.startswith("qswd") for b, q in points]
    for line in (name for name in curve if name.startswith("qswd")):
        for bits, quality in (p for p in curve[line] if p[0] >= 3.9):
            best, method, at = max((q, m, b) for q, m, b in rivals if b <= bits * 1.05)
            ok = quality >= best * (1 - RD_TOLERANCE)
            lines.append(f"- {line} at {bits:.3f} bits: {quality:.4g}; best other at ≤ {bits * 1.05:.2f} bits: "
                         f"{method} {best:.4g} ({at:.3f} bits) → {'met' if ok else 'NOT met'} (within 1%)")
    return lines


def rd_markdown(minilm: dict, fashion: dict | None) -> list[str]:
    lines = ["## Rate–distortion: qswd against kmeans, jlcm and rtn, 0.5 to 6 bits per weight", "",
             "Each method at its own budgets, measured from the files (x: MiniLM whole model, fashion-cnn coded "
             "layers, whose first and last layer are 4-bit scalar codebooks for every method); qswd's budget is a "
             "per-layer ceiling with its codebook and scales counted (with calibration: the whole model's average). "
             "jlcm learns on calibration data; kmeans, rtn and plain qswd use none; qswd's whole pipeline is its "
             "own line: calibrated (input statistics, error feedback, on MiniLM with block tuning where the row "
             "says) and, on fashion-cnn, calibrated + fine-tuned end to end. Target: qswd the best, or within 1% "
             "of the best, at 4 bits and above, and usable at 0.5–1 bit.", "",
             f"![rate–distortion]({RD_PLOT})", ""]
    for model, name, curve in rd_curves(minilm, fashion):
        lines += [f"**{model}** ({name})", "", "| method | bits/w → quality |", "|---|---|"]
        lines += [f"| {m} | " + ", ".join(f"{b:.2f} → {q:.4g}" for b, q in points) + " |" for m, points in curve.items()]
        lines += ["", *rd_verdicts(curve), ""]
    return lines


def plot_rate_distortion(minilm: dict, fashion: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = rd_curves(minilm, fashion)
    figure, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.8), squeeze=False)
    for axis, (model, name, curve) in zip(axes[0], curves):
        for method, points in curve.items():
            axis.plot([b for b, _ in points], [q for _, q in points], marker="o", label=NAMES[method])
        axis.set_xlabel("bits per weight")
        axis.set_ylabel(name)
        axis.set_title(model)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def speed_markdown(result: dict, name: str) -> list[str]:
    """A Speed section: the 4096² layer against dense fp32 and the decode path under each load, and
    Gemma's tokens/s."""
    m, layer = result["machine"], result["layer"]
    where = result.get("gpu") or f"{m['cpu']}, {m['cores']} cores, {m['threads']} threads"
    threads = f"{m['threads']} thread" + ("s" if m["threads"] > 1 else "")
    title = f"on {result['gpu']} (pure torch: no compiled GPU kernel yet)" if result.get("gpu") else \
        f"coded layers on the CPU, {threads}"
    conditions = result["conditions"]
    columns = [c for c in SPEED_COLUMNS if c in conditions[0]["layer"][0]["ms"]]
    lines = [f"## Speed: {title} (`{name}`)", "",
             f"From `benchmarks/results/{name}`, measured by `benchmarks/speed.py`, {result['started']}, on {where}, torch "
             f"{m['torch']}; coded path: {result['backend']}. Every figure is the median of {layer['repeats']} "
             "rounds in one process, each round calling every variant once in turn. The machine is shared: its "
             f"1-minute load average was {result['load_averages_before'][0]:.1f} at the start and "
             f"{result['load_averages_after'][0]:.1f} at the end (0 = idle, 2 = both cores busy).", "",
             f"### {' × '.join(map(str, layer['shape']))} Linear at 2 bits per weight", "",
             f"{layer['call']}: d = {layer['dim']}, k = {layer['k']}, {layer['bits_per_weight']:.3f} bits per weight. "
             + SPEED_LEGEND + " Milliseconds per call:", "",
             "| load | batch | " + " | ".join(columns) + " |", "|---|--:|" + "--:|" * len(columns)]
    for condition in conditions:
        for row in condition["layer"]:
            lines.append(f"| {speed_load(condition)} | {row['batch']} | " + " | ".join(f"{row['ms'][c]:.2f}" for c in columns) + " |")
    lines += [""] + speed_targets(conditions) if "default path" in columns else [""]
    gemma = result.get("gemma")
    if gemma:
        dense_mib, coded_mib = gemma["dense_weight_bytes"] / 2**20, gemma["coded_weight_bytes"] / 2**20
        lines += ["", "### Gemma-270M generating text", "",
                  f"The dense fp32 model against `vqc compress gemma-270m {gemma['settings']}` "
                  f"({gemma['model_bits_per_weight']:.3f} bits per weight for the whole model, "
                  f"{gemma['coded_bits_per_weight']:.3f} for its coded layers) {gemma['path']}; greedy generation of "
                  f"{gemma['new_tokens']} tokens after a {conditions[0]['gemma']['prompt_tokens']}-token prompt with the "
                  f"KV cache, batch 1, prompt included in the time, median of {gemma['generations']} generations each, "
                  "the two models in turn. Resident weights: the bytes of every parameter and buffer each model holds, "
                  f"tied tensors once: {dense_mib:,.1f} MiB dense, {coded_mib:,.1f} MiB coded "
                  f"(1/{dense_mib / coded_mib:.1f}, target ≤ 1/8 — {met(coded_mib <= dense_mib / 8)}).", "",
                  "| load | dense fp32 tokens/s | coded tokens/s | coded / dense |", "|---|--:|--:|--:|"]
        for condition in conditions:
            dense, coded = condition["gemma"]["dense_tokens_per_s"], condition["gemma"]["coded_tokens_per_s"]
            lines.append(f"| {speed_load(condition)} | {dense:.2f} | {coded:.2f} | {coded / dense:.2f}× |")
    return lines + [""]


SPEED_LEGEND = ("*default path* is the coded layer as it comes, no `set_forward_path` (\"auto\": the compiled "
                "kernel on the CPU, choosing the table, the gather or decode-then-multiply by its cost model); *kernel, "
                "table*, *kernel, gather* (d = 8 only) and *kernel, decode-then-multiply* are those ways forced; "
                "*decode path* is `set_forward_path(\"decode\")` "
                "(torch decodes the weight, then `F.linear`); *torch table product* is the `lut` path without the "
                "compiled kernel. *load*: the condition, the 1-minute load average at its start and the cores other "
                "processes kept busy meanwhile (measured from /proc/stat less this process's own CPU time).")


QUIET = 0.25  # cores other processes may keep busy in a run that counts as quiet


def speed_load(condition: dict) -> str:
    """The condition in words: quiet only where other processes were measured to leave the cores alone."""
    others, spinners = condition.get("others_busy_cores"), condition.get("spinners", 0)
    name = (f"{spinners} spinning processes" if spinners else "quiet" if others is not None and others < QUIET
            else "shared, no spinners" if others is not None else condition["name"])
    return name + f", load {condition['load_average']:.1f}" + ("" if others is None else f", others {others:.1f} cores")


def speed_targets(conditions: list[dict]) -> list[str]:
    """Issue 30's targets for the default path: batch 1 ≥ 1.5× dense quiet, not slower than dense with
    the cores busy; never slower than the decode path."""
    lines = []
    for condition in conditions:
        rows = {row["batch"]: row["ms"] for row in condition["layer"]}
        quiet = condition["spinners"] == 0 and (condition.get("others_busy_cores") or 0) < QUIET
        if 1 in rows and (quiet or condition["spinners"]):
            ratio = rows[1]["dense"] / rows[1]["default path"]
            goal, what = (1.5, "at least 1.5× faster than") if quiet else (1.0, "not slower than")
            lines.append(f"- {speed_load(condition)}: batch 1 {what} dense fp32: {ratio:.2f}× — {met(ratio >= goal)}.")
        slowest = max(row["default path"] / row["decode path"] for row in rows.values())
        lines.append(f"- {speed_load(condition)}: never slower than the decode path: at most {slowest:.2f}× its time — "
                     f"{met(slowest <= 1)}.")
    return lines


def gemma_markdown(result: dict) -> list[str]:
    """The Gemma-270M section: each command line's bits, perplexity against dense, time and memory."""
    dense = result["dense"]["perplexity"]
    lines = ["## gemma-270m: perplexity of the compressed model", "",
             "Generated from `benchmarks/results/gemma.json` (`.venv/bin/python -m benchmarks.gemma`). Each row is "
             "`vqc compress gemma-270m ARGS --json` in a fresh process pinned to 2 cores (time and peak memory of "
             "the whole command: load, calibration on wiki windows, fit, file write), then `vqc eval` on its file "
             "(perplexity on the first 2,048 tokens of lee_background, 512-token windows, the suite's protocol), "
             "and the same on the first 16,384 tokens (a larger sample: small differences at 2,048 tokens can be "
             "noise). Arguments that go on with `&& vqc finetune FILE …` are that row's file distilled further "
             "(time and peak memory: both commands'). "
             f"Dense fp32 model, scored in the same run: perplexity {dense:.2f}{_long(result['dense'])}; its weights take "
             f"{result['dense']['weight_bytes'] / 2**20:,.0f} MiB.", "",
             "| configuration | arguments | bits/w (model) | bits/w (coded layers) | perplexity | × dense | "
             "16,384 tokens | × dense | time | peak memory |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    long_dense = result["dense"].get("perplexity_long")
    for row in result["rows"]:
        long = (f"{row['perplexity_long']:,.2f} | {row['perplexity_long'] / long_dense:.2f}×"
                if row.get("perplexity_long") and long_dense else "— | —")
        lines.append(f"| {row['label']} | `{' '.join(row['args'])}` | {row['model_bits_per_weight']:.3f} | "
                     f"{row['coded_bits_per_weight']:.3f} | {row['perplexity']:,.2f} | {row['perplexity'] / dense:.2f}× | "
                     f"{long} | {row['seconds'] / 60:.1f} min | {row['peak_memory_mib']:,.0f} MiB |")
    notes = [f"- {row['label']}: {row['note']}." for row in result["rows"] if row.get("note")]
    lines += ["", *notes] if notes else []
    rows = result["rows"] + result.get("peers", [])
    return lines + ["", f"Machine: {rows_machines(rows)}; rows measured "
                        f"{min(r['date'] for r in rows)[:10]} to {max(r['date'] for r in rows)[:10]}.", "",
                    *gemma_peers_markdown(result)]


def gemma_peers_markdown(result: dict) -> list[str]:
    """Our rows that code only the Linear layers beside the peers' rows, which do the same."""
    if not result.get("peers"):
        return []
    ours = [row for row in result["rows"] if "Linear layers only" in row["label"]]
    dense, long_dense = result["dense"]["perplexity"], result["dense"].get("perplexity_long")
    lines = ["### Side by side with HQQ and coremltools SKM: the Linear layers at about 2 bits", "",
             "Every Linear layer of the 18 blocks coded, the tied token embedding and head left dense, so the "
             "peers (HQQ codes Linear layers only) and ours code the same weights. The peers run in place in a "
             "fresh process (`python -m benchmarks.gemma --only LABEL`); *time* is the peer's own quantization "
             "call, *peak* the process's maximum RSS up to its end (model load included, evaluation not). HQQ "
             "holds its scales and zeros in fp32 on CPU and is counted so. SKM's sensitivities are the squared "
             "gradients of the next-token loss on the same 64 wiki windows our calibrated rows use (SqueezeLLM's "
             "recipe).", "",
             "| tool | configuration | bits/w (coded layers) | perplexity | × dense | 16,384 tokens | × dense | time | peak memory |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for tool, row in [*(("vqcompress", row) for row in ours), *(("peer", row) for row in result["peers"])]:
        lines.append(f"| {tool} | {row['label']} | {row['coded_bits_per_weight']:.3f} | {row['perplexity']:,.2f} | "
                     f"{row['perplexity'] / dense:,.2f}× | {row['perplexity_long']:,.2f} | "
                     f"{row['perplexity_long'] / long_dense:,.2f}× | {_minutes(row['seconds'])} | "
                     f"{row['peak_memory_mib']:,.0f} MiB |")
    return lines + [""]


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _long(dense: dict) -> str:
    """The dense model's 16,384-token perplexity, where measured."""
    return f" ({dense['perplexity_long']:.2f} on 16,384 tokens)" if dense.get("perplexity_long") else ""


def _grid(spec: list | None) -> str:
    bits, group = spec
    return "fp16" if bits == 16 else f"{bits}-bit per row" if group == 640 else f"{bits}-bit per {group}"


def gemma_parts_markdown(result: dict, dense: float) -> list[str]:
    """Where a Gemma file's perplexity goes: each part decoded alone; the embedding's tiers."""
    lines = ["### Where the perplexity goes", "",
             "Generated from `benchmarks/results/gemma-parts.json` (`.venv/bin/python -m benchmarks.gemma_parts FILE… "
             "--embedding`). The dense model with only one part's weights replaced by a bench file's decoded ones "
             f"(perplexity, dense {dense:.2f}):", ""]
    names = list(result["files"][0]["perplexity"]) if result["files"] else []
    lines += ["| file | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for row in result["files"]:
        lines.append(f"| {row['file']} | " + " | ".join(f"{row['perplexity'][n]:.2f}" for n in names) + " |")
    study = result.get("embedding")
    if study:
        lines += ["", "The tied embedding alone under round-to-nearest (asymmetric, fp16 scale and offset per group), "
                  "uniform or in two tiers: the rows the wiki calibration text uses most on one grid, the rest on another "
                  "(the evaluation text is not wiki):", "",
                  "| most used rows | their grid | other rows' grid | bits/w | perplexity | × dense |", "|--:|---|---|--:|--:|--:|"]
        for row in study["rows"]:
            top = f"{row['top_rows']:,}" if row["top_rows"] else "—"
            lines.append(f"| {top} | {_grid(row['top']) if row['top_rows'] else '—'} | {_grid(row['rest'])} | "
                         f"{row['bits_per_weight']:.2f} | {row['perplexity']:,.2f} | {row['perplexity'] / dense:.2f}× |")
        lines += ["", "For scale, every Linear layer under round-to-nearest, the embedding dense:", "",
                  "| grid | bits/w | perplexity | × dense |", "|---|--:|--:|--:|"]
        lines += [f"| {_grid(row['grid'])} | {row['bits_per_weight']:.2f} | {row['perplexity']:,.2f} | "
                  f"{row['perplexity'] / dense:.2f}× |" for row in study["linear"]]
    last = max([r["date"] for r in result["files"]] + ([study["date"]] if study else []))
    return lines + ["", f"Measured on {result['machine']['cpu']}, {last[:10]}.", ""]


def _figure(row: dict) -> str:
    """A finished cell's quality in a few characters: the suite's headline figure against fp32."""
    compressed, fp32 = row.get("compressed") or {}, row.get("fp32") or {}
    if "cosine" in compressed:
        return f"cosine {compressed['cosine']:.3f}"
    if "perplexity" in compressed:
        return f"perplexity {compressed['perplexity'] / fp32['perplexity']:.2f}× fp32"
    key = next(iter(compressed), None)
    return "" if key is None else f"{key} {compressed[key]:.3g} (fp32 {fp32[key]:.3g})"


def matrix_cell(row: dict | None) -> str:
    if row is None:
        return "not run yet"
    if row["status"].startswith("finished"):
        scored = _figure(row) if row["status"] == "finished" else row["status"]
        return f"{row['bits_per_weight']:.2f} b/w, {scored}, {_minutes(row['seconds'])}"
    return f"**{row['status']}** in {row['seconds']:.0f} s: {row.get('message', '')}".replace("|", "/")


def llamacpp_markdown(result: dict) -> list[str]:
    """llama.cpp's own types on Gemma-270M, each file scored by the gemma-270m suite."""
    dense, imatrix = result["dense"], result["settings"]["imatrix"]
    check = result["tokenizer_check"]
    lines = ["## gemma-270m beside llama.cpp: its 2–4-bit types scored by our suite", "",
             "Generated from `benchmarks/results/llamacpp.json` (`make bench-llamacpp`, i.e. `.venv/bin/python -m "
             f"benchmarks.llamacpp`). llama.cpp as the `llama-cpp-python` {result['llama_cpp_python']} sdist vendors it, "
             "built here: the dense model folder converted to an f32 GGUF (`convert_hf_to_gguf.py`, the tokenizer keys "
             f"of the shipped GGUF copied over; the suite's tokenizer, transformers' and llama.cpp's own tokenize the "
             f"first {check['tokens']:,} tokens of the evaluation text alike), an importance matrix from `llama-imatrix` "
             f"on {imatrix['chunks']} chunks of {imatrix['context']} tokens of the `--calib {imatrix['calib']}` text "
             "(as our calibrated rows' 64 windows), then `llama-quantize --imatrix` to each type. Each file is loaded "
             "back with transformers (dequantized to fp32) and scored by the gemma-270m suite's own function (first "
             "2,048 tokens of lee_background, 512-token windows). *File* bits/w: the file's bytes × 8 over all "
             f"{dense['parameters']:,} parameters; *Linear*: the {dense['linear_layers']} block Linear weights' bytes × 8 "
             "over their weights (GGUF tensor types). llama.cpp keeps the tied 262,144 × 640 token embedding at "
             f"{', '.join(sorted({r['embedding_type'] for r in result['rows']}))} whatever the type asked for, and "
             "a tensor whose rows (640 inputs) its 256-weight super-blocks do not divide at a fallback type (the "
             "*held in* column), so its files are large as a whole: compare them with our "
             "whole-model rows at the file's bits and with the *Linear layers only* rows at the Linear bits. "
             "Tokens/s: `llama-bench " + " ".join(result["settings"]["llama_bench"]) + "` (prompt of 64, then 64 "
             "generated), run like every step under `" + " ".join(result["settings"]["nice"]) + "` on a machine "
             "whose 2 cores other work shared (*load*: the 1-minute load average as it ended): lower bounds, not "
             "idle-machine figures.", "",
             "| type | file bits/w | Linear bits/w | Linear layers held in | token embedding | perplexity | × dense | "
             "prompt tok/s | generation tok/s | load |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for row in [dense, *result["rows"]]:
        held = ", ".join(f"{kind} ×{count}" for kind, count in sorted(row["linear_types"].items(), key=lambda kv: -kv[1]))
        speed = row["speed"]
        lines.append(f"| {row['type'] + ' (dense)' if row is dense else row['type']} | {row['file_bits_per_weight']:.3f} | "
                     f"{row['linear_bits_per_weight']:.3f} | {held} | {row['embedding_type']} | {row['perplexity']:,.2f} | "
                     f"{row['perplexity'] / dense['perplexity']:.2f}× | {speed['prompt_64']['tokens_per_second']:,.1f} | "
                     f"{speed['generation_64']['tokens_per_second']:,.1f} | "
                     f"{(row.get('speed_load_average') or row['load_average'])[0]:.1f} |")
    rows = [dense, *result["rows"]]
    lines += [""] + [f"- {row['type']}: `llama-bench` crashed with its default settings "
                     f"({row['speed']['failed'][0]['error'].rstrip(':')}); its tokens/s are `llama-bench {' '.join(row['speed']['args'])}`."
                     for row in rows if row["speed"].get("failed")]
    return lines + ["", f"Machine: {rows_machines(rows)}; measured {min(r['date'] for r in rows)[:10]} to "
                        f"{max(r['date'] for r in rows)[:10]}.", ""]


def llamacpp_matched(result: dict, gemma: dict) -> list[str]:
    """Each llama.cpp type against our best Gemma row (gemma.json) at or under both its file's and its
    Linear layers' bits per weight, scored alike (the suite's 2,048 tokens)."""
    ours = [row for row in gemma["rows"] if row.get("linear_bits_per_weight")]
    lines = ["### At matched sizes", "",
             "Each llama.cpp type beside the lowest-perplexity vqcompress row of the Gemma table (rows that record "
             "their Linear layers' bits) whose file **and** Linear layers are both at or under the type's bits per "
             "weight; *ahead*: our perplexity is lower.", "",
             "| llama.cpp type | file bits/w | Linear bits/w | perplexity | vqcompress row | file bits/w | Linear bits/w | "
             "perplexity | ahead |", "|---|---:|---:|---:|---|---:|---:|---:|---|"]
    for theirs in result["rows"]:
        fits = [row for row in ours if row["model_bits_per_weight"] <= theirs["file_bits_per_weight"]
                and row["linear_bits_per_weight"] <= theirs["linear_bits_per_weight"]]
        best = min(fits, key=lambda row: row["perplexity"], default=None)
        mine = (f"{best['label']} | {best['model_bits_per_weight']:.3f} | {best['linear_bits_per_weight']:.3f} | "
                f"{best['perplexity']:,.2f} | {'**yes**' if best['perplexity'] < theirs['perplexity'] else 'no'}"
                if best else "none measured at this size | | | | —")
        lines.append(f"| {theirs['type']} | {theirs['file_bits_per_weight']:.3f} | {theirs['linear_bits_per_weight']:.3f} | "
                     f"{theirs['perplexity']:,.2f} | {mine} |")
    return lines + [""]


def matrix_markdown(result: dict) -> list[str]:
    """Every method × model × budget as the plain command: finished (bits from the file, quality,
    time) or refused in its first seconds, with the line it said."""
    rows = result["rows"]
    by_cell = {(r["model"], r["method"], r["bits"]): r for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    budgets = sorted({r["bits"] for r in rows})
    finished = sum(r["status"] == "finished" for r in rows)
    quick = sum(r["status"] == "refused" and r["seconds"] <= result["fast_failure_seconds"] for r in rows)
    tracebacks = sum(r["traceback"] for r in rows)
    lines = ["## The plain command on every model (`benchmarks/matrix.py`)", "",
             "Each cell is `vqc compress MODEL --method M --bits B -o F` with no other flag, in a fresh process, "
             "then `vqc eval F` (the model's default suite, against its own uncompressed model). Bits per weight "
             "are the file's bytes × 8 over the model's parameters.", "",
             f"{len(rows)} cells measured: {finished} finished, {quick} refused within "
             f"{result['fast_failure_seconds']:.0f} s with one line, {len(rows) - finished - quick} other; "
             f"{tracebacks} printed a traceback.", ""]
    for model in models:
        lines += [f"### {model}", "", "| method | " + " | ".join(f"{b:g} bits" for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        lines += [f"| {method} | " + " | ".join(matrix_cell(by_cell.get((model, method, b))) for b in budgets) + " |"
                  for method in methods]
        lines.append("")
    dates = sorted(r["measured"] for r in rows)
    return lines + [f"Measured on {result['machine']['cpu']} ({result['machine']['cores']} cores), {dates[0][:10]} to "
                    f"{dates[-1][:10]}; the load average at each cell's start is in the results file.", ""]
#: each wheel network's suite figures, in the order shown (see vqcompress.suites.ppocr / silero)
PRETRAINED_METRICS = {"ppocr-rec": ("same", "exact"), "ppocr-cls": ("agreement", "accuracy"),
                      "silero-vad": ("agreement", "error")}


def pretrained_markdown(result: dict) -> list[str]:
    """The wheel networks: fp32 against the plain data-free call at 4 and 2 bits, per method."""
    lines = ["## Real pretrained networks from wheels: the plain data-free call", "",
             "Generated from `benchmarks/results/pretrained.json` (`make bench-pretrained`). Each cell is "
             "`compress(model, method=M, bits=B)` with nothing else, saved and loaded back with `load(path, like=model)`. "
             "ppocr-rec: `same` = % of 100 rendered news lines read exactly as fp32 reads them, `exact` = % read as "
             "written; ppocr-cls: `agreement` = % of 100 lines (half turned by 180°) oriented as fp32 orients them, "
             "`accuracy` = % right; silero-vad: `agreement` = % of 540 windows (32 ms, ALSA's voice clips) decided as "
             "fp32 decides them, `error` = mean |Δ probability| in points. Bits: the file's bytes × 8 over all the "
             "network's weights (parameters and graph buffers) / over the coded layers' weights.", "",
             "| network | method | bits | figures | file bits/weight | coded bits/weight | time |", "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        names = PRETRAINED_METRICS[row["network"]]
        if "refused" in row:
            figures, sizes = f"refused: {row['refused']}", "| – | –"
        else:
            figures = ", ".join(f"{name} {row[name]:g}" for name in names)
            sizes = "| – | –" if row["method"] == "fp32" else f"| {row['file_bits_per_weight']:.2f} | {row['coded_bits_per_weight']:.2f}"
        seconds = f"{row['seconds']:.1f} s" if "seconds" in row else "–"
        lines.append(f"| {row['network']} | {row['method']} | {row['bits']:g} | {figures} {sizes} | {seconds} |")
    return lines + ["", f"Measured on {result['machine']['cpu']}, {result['started'][:10]}.", ""]


def incoherence_markdown(result: dict) -> list[str]:
    """Relative error at about 2 bits per weight: each quantizer on Gaussian weights and on every
    Linear layer of each network, as they are and rotated; the Done bar is 0.072 on the Gaussian
    and, rotated, every layer within 10% of the quantizer's Gaussian figure."""
    lines = ["## Quantizers against the rate–distortion limit: the incoherence rotation", "",
             "Generated from `benchmarks/results/incoherence.json` (`.venv/bin/python -m benchmarks.incoherence`). "
             "Relative squared error ‖W − Ŵ‖² / ‖W‖² of each weight coded alone (no calibration), at the bits per "
             f"weight shown (codes, codebook and row scales); the Gaussian limit at 2 bits is {result['limit']:.4f}. "
             "Layers: the median and the worst over every Linear layer; within 10%: how many layers, rotated, lie "
             "within 10% of the same quantizer's Gaussian figure.", "",
             "| quantizer | weights | layers | bits/weight | as they are: median / worst | rotated: median / worst "
             "| kurtosis as they are → rotated | rotated within 10% of Gaussian |", "|---|---|---|---|---|---|---|---|"]
    rows = result["rows"]
    for quantizer in dict.fromkeys(r["quantizer"] for r in rows):
        gaussian = next((r["relative_error"] for r in rows if r["quantizer"] == quantizer and r["source"] == "gaussian"
                         and r["rotated"]), None)
        for source in dict.fromkeys(r["source"] for r in rows):
            raw = [r for r in rows if r["quantizer"] == quantizer and r["source"] == source and not r["rotated"]]
            turned = [r for r in rows if r["quantizer"] == quantizer and r["source"] == source and r["rotated"]]
            if not turned:
                continue
            errors = [sorted(r["relative_error"] for r in part) for part in (raw, turned)]
            kurtosis = [sorted(r["kurtosis"] for r in part) for part in (raw, turned)]
            within = sum(abs(e / gaussian - 1) <= 0.10 for e in errors[1]) if gaussian else 0
            bits = sorted(r["bits_per_weight"] for r in turned)
            as_they_are = f"{errors[0][len(raw) // 2]:.4f} / {errors[0][-1]:.4f}" if raw else "not measured"
            kurtosis_raw = f"{kurtosis[0][len(raw) // 2]:.1f}" if raw else "–"
            lines.append(f"| {quantizer} | {source} | {len(turned)} | {bits[len(bits) // 2]:.3f} "
                         f"| {as_they_are} | {errors[1][len(turned) // 2]:.4f} / {errors[1][-1]:.4f} "
                         f"| {kurtosis_raw} → {kurtosis[1][len(turned) // 2]:.2f} | {within} of {len(turned)} |")
    return lines + ["", f"Measured on {result['machine']['cpu']}, {result['measured'][:10]}.", ""]


def fuzz_markdown(result: dict) -> list[str]:
    """`make fuzz`: mutated small .vqc files of every form, each loaded, reported and inspected in a
    worker under a time and a memory limit, against issue 33's targets."""
    limits, totals = result["limits"], result["totals"]
    failed = sum(n for key, n in totals.items() if key.startswith("crash") or key in ("memory", "lost"))
    over = totals.get("over 5 s", 0) + totals.get("lost", 0) + totals.get("memory", 0)
    changed = sum(counts.get("changed", 0) for key, counts in result["counts"].items() if key.endswith("/bytes"))
    lines = ["## Fuzzing the file reader (`make fuzz`)", "",
             f"Generated from `benchmarks/results/fuzz.json` (`.venv/bin/python -m benchmarks.fuzz`), {result['finished']} (finished), "
             f"{result['seconds'] / 60:.1f} min: {result['cases_per_form_and_kind']:,} mutations of each kind for each "
             f"file form ({', '.join(result['forms'])}), each loaded (and run), reported and inspected (text and JSON) "
             f"in a worker held to {limits['seconds']:.0f} s and {limits['memory_bytes'] >> 30} GiB. *bytes*: a "
             "stranger's file, bytes flipped, overwritten, cut or inserted anywhere; *manifest*: 1–3 fields of the "
             "manifest replaced, removed or added and its sha256 made anew, so that only the schema stands in the way "
             "(a consistent edit may load as another model: counted apart).", "",
             "| form / kind | cases | loads, same outputs | refused (one VQCError line) | loads, other outputs | "
             "other exceptions | over the limits |", "|---|---:|---:|---:|---:|---:|---:|"]
    for key, counts in result["counts"].items():
        other = sum(n for name, n in counts.items() if name.startswith("crash"))
        beyond = counts.get("over 5 s", 0) + counts.get("lost", 0) + counts.get("memory", 0)
        cases = sum(n for name, n in counts.items() if name != "over 5 s")
        lines.append(f"| {key} | {cases:,} | {counts.get('same', 0):,} | {counts.get('refused', 0):,} | "
                     f"{counts.get('changed', 0):,} | {other:,} | {beyond:,} |")
    return lines + ["", f"Exceptions other than VQCError: {failed} ({met(failed == 0)}); cases over "
                        f"{limits['seconds']:.0f} s or {limits['memory_bytes'] >> 30} GiB: {over} ({met(over == 0)}); "
                        f"a stranger's edit that loads with other outputs: {changed} ({met(changed == 0)}). "
                        f"Slowest case {result['slowest_case_seconds']:.2f} s.", ""]


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [
        "# Benchmarks", "",
        "Generated by `benchmarks/render.py` from `benchmarks/results/minilm.json`; do not edit by hand.", "",
        "Regenerate (measure everything again, then render): `make bench`, i.e. `.venv/bin/python -m benchmarks.run`. "
        "Re-render from the stored results only: `.venv/bin/python -m benchmarks.render`.", "",
        "## minilm: all-MiniLM-L6-v2, the whole model including word embeddings", "",
        f"Measured {result['started']}; the whole bench took {result['seconds'] / 60:.1f} min, each row in a fresh "
        "process, one after another." + (f" Some rows were measured again later (the last on {result['updated']}); "
                                         "each row's own date is in the results file." if result.get("updated") else ""), "",
        *results_table(rows), "",
        f"![rate–distortion on minilm]({PLOT})", "",
        "### How the rows were counted", "", *notes(rows), "",
        "### Timing: `vqc compress`, kmeans at 2 bits", "", *timing_section(result["timing"]), "",
        "### Machine", "", *machine_lines(result), "",
    ]
    fashion = json.loads(FASHION.read_text()) if FASHION.exists() else None
    if fashion:
        lines += fashion_markdown(fashion)
    if any(r["method"] == "qswd" for r in rows):
        lines += rd_markdown(result, fashion)
    gemma = json.loads(GEMMA.read_text()) if GEMMA.exists() else None
    if gemma and gemma["rows"]:
        lines += gemma_markdown(gemma)
        if GEMMA_PARTS.exists():
            lines += gemma_parts_markdown(json.loads(GEMMA_PARTS.read_text()), gemma["dense"]["perplexity"])
    if LLAMACPP.exists():
        llamacpp = json.loads(LLAMACPP.read_text())
        lines += llamacpp_markdown(llamacpp) + (llamacpp_matched(llamacpp, gemma) if gemma else [])
    if PRETRAINED.exists():
        lines += pretrained_markdown(json.loads(PRETRAINED.read_text()))
    if UNIVERSAL.exists():
        lines += universal_markdown(json.loads(UNIVERSAL.read_text()))
    if INCOHERENCE.exists():
        lines += incoherence_markdown(json.loads(INCOHERENCE.read_text()))
    if MATRIX.exists():
        lines += matrix_markdown(json.loads(MATRIX.read_text()))
    if FUZZ.exists():
        lines += fuzz_markdown(json.loads(FUZZ.read_text()))
    for path in sorted((ROOT / "benchmarks" / "results").glob(SPEED_RUNS)):
        lines += speed_markdown(json.loads(path.read_text()), path.name)
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Quality against whole-model bits per weight, one line per method, fp32 as the target."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fp32 = next(r for r in rows if r["method"] == "fp32")
    lines: dict[str, list[dict]] = {}
    for row in rows:
        lines.setdefault(line_name(row), []).append(row)
    panels = [("cosine to fp32 embeddings", lambda r: r["cosine"]),
              ("Spearman (mean of 3) relative to fp32", lambda r: relative_spearman(r, fp32))]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for axis, (title, metric) in zip(axes, panels):
        for name, members in lines.items():
            members = sorted(members, key=lambda r: r["model_bits_per_weight"])
            axis.plot([r["model_bits_per_weight"] for r in members], [metric(r) for r in members],
                      marker="*" if name == NAMES["fp32"] else "o", markersize=12 if name == NAMES["fp32"] else 6,
                      label=name)
        axis.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        axis.set_xscale("log", base=2)
        axis.set_xticks([1, 2, 4, 8, 16, 32], ["1", "2", "4", "8", "16", "32"])
        axis.set_xlabel("whole-model bits per weight (log scale)")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"all-MiniLM-L6-v2, whole model ({result['started'][:10]})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    result = json.loads(RESULT.read_text())
    DOCS.mkdir(exist_ok=True)
    plot(result, DOCS / PLOT)
    if any(r["method"] == "qswd" for r in result["rows"]):
        plot_rate_distortion(result, json.loads(FASHION.read_text()) if FASHION.exists() else None, DOCS / RD_PLOT)
    (DOCS / "benchmarks.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
