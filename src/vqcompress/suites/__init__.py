"""Quality suites: task metrics that say how much a compressed model has lost against its original.

``run_suite`` evaluates the compressed model and its own uncompressed source (the model the file
was made from, checked by its sha256) in the same run, so the figures it prints side by side were
both measured here and now. A suite suits a kind of model, not one model: ``similarity`` (the
MiniLM benchmark: Spearman correlation with human similarity judgements, cosine to the original's
embeddings) for any sentence encoder with a tokenizer, ``perplexity`` (Gemma-270M's) for any
causal LM, ``fashion`` for the zoo's Fashion-MNIST classifiers.
"""

from __future__ import annotations

from torch import nn

from ..errors import VQCError

#: suite name (the benchmark model's names too) → the kind of suite
SUITES = {"similarity": "similarity", "minilm": "similarity", "perplexity": "perplexity", "gemma-270m": "perplexity",
          "fashion": "fashion", "fashion-cnn": "fashion", "fashion-vit": "fashion"}
#: networks from wheels whose task is their own (a text recognizer, a direction classifier, a VAD):
#: each has the suite of that task, named after it
TASK_SUITES = ("ppocr-rec", "ppocr-cls", "silero-vad")
SUITES |= {name: name for name in TASK_SUITES}


def suite_for(source: dict) -> str:
    """The default suite of a file's source model: by its kind, never by its name."""
    if source.get("kind") == "zoo":
        return "fashion"
    if source.get("kind") == "bundled" and source.get("name") in TASK_SUITES:
        return source["name"]
    if source.get("kind") in ("bundled", "folder"):
        return "perplexity" if source.get("architecture", "").endswith("ForCausalLM") else "similarity"
    raise VQCError(f"no quality suite is known for {source.get('name')!r} (a plain module): evaluate it in Python")


def _figures(kind: str, model: nn.Module, reference: nn.Module, source: dict, device: str,
             tokens: int | None = None) -> tuple[dict, dict]:
    """(compressed, fp32) figures of one suite; ``tokens``: how much text the perplexity suite scores."""
    if kind == "fashion":
        from . import fashion

        return fashion.evaluate(model, device), fashion.evaluate(reference, device)
    if kind in TASK_SUITES:  # figures against fp32's outputs, so both runs see it
        from . import ppocr, silero

        evaluate = {"ppocr-rec": ppocr.evaluate_rec, "ppocr-cls": ppocr.evaluate_cls, "silero-vad": silero.evaluate}[kind]
        return evaluate(model, reference, device=device), evaluate(reference, device=device)
    from transformers import AutoTokenizer

    from ..models import model_folder
    from . import gemma, minilm

    folder = model_folder(source)
    if folder is None or not any(folder.glob("tokenizer*")):
        raise VQCError(f"the {kind} suite needs the source model's tokenizer, which is not on this machine")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if kind == "perplexity":  # lower is better, so its ratio is above 1 for a loss
        size = {"tokens": tokens} if tokens else {}
        return (gemma.evaluate(model, tokenizer, device=device, **size),
                gemma.evaluate(reference, tokenizer, device=device, **size))
    return (minilm.evaluate(model, tokenizer, reference=reference, device=device),
            minilm.evaluate(reference, tokenizer, device=device))


def _ratio(compressed: float, dense: float) -> str:
    """compressed / fp32, or a dash where fp32's figure is 0 (an error against fp32 itself)."""
    return f"{compressed / dense:.3f}" if dense else "-"


def run_suite(name: str | None, model: nn.Module, source: dict, device: str = "cpu", tokens: int | None = None) -> dict:
    """Figures of ``model`` and of its fp32 source on suite ``name`` (default: the one for its kind),
    plus a printable ``table``. ``tokens``: the perplexity suite scores the first ``tokens`` tokens of
    its text instead of its 2,048 (a larger sample tells close files apart)."""
    name = name or suite_for(source)
    if name not in SUITES:
        raise VQCError(f"unknown suite {name!r}: choose from {', '.join(SUITES)}")
    kind = SUITES[name]
    expected = suite_for(source) if source.get("kind") != "module" else kind
    if kind != expected:
        raise VQCError(f"the {name} suite is for another kind of model than {source.get('name')!r}: use --suite {expected}")
    if tokens is not None and kind != "perplexity":
        raise VQCError(f"--tokens sets how much text the perplexity suite scores, not {name}'s")
    if tokens is not None and tokens < 2:
        raise VQCError(f"--tokens must be at least 2, got {tokens}")
    from ..models import original_model

    reference = original_model(source).to(device)
    compressed, dense = _figures(kind, model, reference, source, device, tokens)
    rows = [f"{'metric':<12} {'fp32':>8} {'compressed':>11} {'ratio':>7}"]
    rows += [f"{m:<12} {dense[m]:>8.3f} {compressed[m]:>11.3f} {_ratio(compressed[m], dense[m]):>7}" for m in dense]
    if "cosine" in compressed:
        rows.append(f"{'cosine':<12} {1:>8.3f} {compressed['cosine']:>11.4f}   (embeddings vs fp32, held-out sentences)")
    return {"suite": name, "fp32": dense, "compressed": compressed, "table": "\n".join(rows)}
