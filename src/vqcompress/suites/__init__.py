"""Quality suites: task metrics that say how much a compressed model has lost against its original.

``run_suite`` evaluates the compressed model and its uncompressed source in the same run, so the
figures it prints side by side were both measured here and now.
"""

from __future__ import annotations

from torch import nn

from ..errors import VQCError

SUITES = ("minilm", "gemma-270m", "fashion-cnn", "fashion-vit", "ppocr-rec", "ppocr-cls", "silero-vad")


def suite_for(source: dict) -> str:
    """The default suite of a file's source model."""
    if source.get("kind") in ("bundled", "zoo") and source.get("name") in SUITES:
        return source["name"]
    raise VQCError(f"no default quality suite for {source.get('name')!r}: choose one with --suite ({', '.join(SUITES)})")


def _figures(name: str, model: nn.Module, reference: nn.Module, source: dict, device: str,
             tokens: int | None = None) -> tuple[dict, dict]:
    """(compressed, fp32) figures of one suite; ``tokens``: how much text gemma-270m scores."""
    if name in ("minilm", "gemma-270m"):
        from transformers import AutoTokenizer

        from ..models import model_folder
        from . import gemma, minilm

        tokenizer = AutoTokenizer.from_pretrained(str(model_folder(source)))
        if name == "gemma-270m":  # perplexity: lower is better, so its ratio is above 1 for a loss
            size = {"tokens": tokens} if tokens else {}
            return (gemma.evaluate(model, tokenizer, device=device, **size),
                    gemma.evaluate(reference, tokenizer, device=device, **size))
        return (minilm.evaluate(model, tokenizer, reference=reference, device=device),
                minilm.evaluate(reference, tokenizer, device=device))
    if name in ("ppocr-rec", "ppocr-cls", "silero-vad"):  # figures against fp32's outputs, so both runs see it
        from . import ppocr, silero

        evaluate = {"ppocr-rec": ppocr.evaluate_rec, "ppocr-cls": ppocr.evaluate_cls, "silero-vad": silero.evaluate}[name]
        return evaluate(model, reference, device=device), evaluate(reference, device=device)
    from . import fashion

    return fashion.evaluate(model, device), fashion.evaluate(reference, device)


def _ratio(compressed: float, dense: float) -> str:
    """compressed / fp32, or a dash where fp32's figure is 0 (an error against fp32 itself)."""
    return f"{compressed / dense:.3f}" if dense else "-"


def run_suite(name: str | None, model: nn.Module, source: dict, device: str = "cpu", tokens: int | None = None) -> dict:
    """Figures of ``model`` and of its fp32 source on suite ``name``, plus a printable ``table``.
    ``tokens``: gemma-270m scores the first ``tokens`` tokens of its text instead of its 2,048 (a
    larger sample tells close files apart; the reference figure is the 2,048 tokens')."""
    name = name or suite_for(source)
    if name not in SUITES:
        raise VQCError(f"unknown suite {name!r}: choose from {', '.join(SUITES)}")
    if tokens is not None and name != "gemma-270m":
        raise VQCError(f"--tokens sets how much text gemma-270m scores, not {name}'s")
    if tokens is not None and tokens < 2:
        raise VQCError(f"--tokens must be at least 2, got {tokens}")
    from ..models import load_model

    reference, _ = load_model(name, seed=(source.get("config") or {}).get("seed", 0))
    compressed, dense = _figures(name, model, reference.to(device), source, device, tokens)
    rows = [f"{'metric':<12} {'fp32':>8} {'compressed':>11} {'ratio':>7}"]
    rows += [f"{m:<12} {dense[m]:>8.3f} {compressed[m]:>11.3f} {_ratio(compressed[m], dense[m]):>7}" for m in dense]
    if "cosine" in compressed:
        rows.append(f"{'cosine':<12} {1:>8.3f} {compressed['cosine']:>11.4f}   (embeddings vs fp32, held-out sentences)")
    return {"suite": name, "fp32": dense, "compressed": compressed, "table": "\n".join(rows)}
