"""`make bench-pretrained`: real pretrained networks from PyPI wheels, fp32 against 2 and 4 bits.

    .venv/bin/python -m benchmarks.pretrained          # from the repository root; about 10 min on 2 cores

Each network (``vqcompress.models.pretrained``: the PP-OCRv4 recognizer, the PP-OCR direction
classifier, Silero VAD) is compressed by the plain API call a user types,
``compress(model, method=M, bits=B)`` — no calibration data, no other option —, saved, loaded
back with ``load(path, like=model)`` and scored by its suite (``vqcompress.suites.ppocr`` /
``silero``; the metrics are stated there). A call that refuses the network is recorded with its
one-line reason. Bits per weight are the file's bytes × 8 over the network's weights
(parameters and weight buffers, e.g. onnx2torch's graph constants), header included; the coded
layers' own figure is beside it. Results go to benchmarks/results/pretrained.json;
benchmarks/render.py puts them into docs/benchmarks.md.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

from .run import ROOT, machine, now, write_json

RESULTS = ROOT / "benchmarks" / "results" / "pretrained.json"
NETWORKS = ("ppocr-rec", "ppocr-cls", "silero-vad")
METHODS = ("kmeans", "rtn")
BITS = (4, 2)


def weights(model) -> int:
    """Every number the network holds: parameters and buffers (a converted graph keeps weights in buffers)."""
    return sum(t.numel() for t in [*model.parameters(), *model.buffers()])


def suite(name: str):
    """The network's suite as ``evaluate(model, reference)``."""
    from vqcompress.suites import ppocr, silero

    return {"ppocr-rec": ppocr.evaluate_rec, "ppocr-cls": ppocr.evaluate_cls, "silero-vad": silero.evaluate}[name]


def measure(name: str, method: str, bits: float, reference, folder: Path) -> dict:
    """One cell: the plain call, the file, its figures (or the reason it was refused)."""
    import vqcompress as vqc

    started = time.perf_counter()
    try:
        coded = vqc.compress(copy.deepcopy(reference), method=method, bits=bits, progress=False)
    except vqc.VQCError as error:
        return {"network": name, "method": method, "bits": bits, "refused": str(error),
                "seconds": round(time.perf_counter() - started, 2)}
    seconds = time.perf_counter() - started
    path = folder / f"{name}-{method}-{bits}.vqc"
    vqc.save(coded, path)
    loaded = vqc.load(path, like=copy.deepcopy(reference))
    return {"network": name, "method": method, "bits": bits, "seconds": round(seconds, 2),
            "file_bits_per_weight": round(path.stat().st_size * 8 / weights(reference), 3),
            "coded_bits_per_weight": round(vqc.report(loaded).coded_bits_per_weight, 3),
            **suite(name)(loaded, reference), "date": now()}


def main() -> None:
    from vqcompress.models import load_model

    rows, started = [], now()
    with tempfile.TemporaryDirectory() as folder:
        for name in NETWORKS:
            reference, source = load_model(name)
            rows.append({"network": name, "method": "fp32", "bits": 32, "weights": weights(reference),
                         "sha256": source.sha256, **suite(name)(reference, None), "date": now()})
            for method in METHODS:
                for bits in BITS:
                    rows.append(measure(name, method, bits, reference, Path(folder)))
                    print(rows[-1], flush=True)
    write_json(RESULTS, {"started": started, "machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
