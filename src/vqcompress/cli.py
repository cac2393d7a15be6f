"""The ``vqc`` command: compress, finetune, inspect, eval, decompress, demo, bench-speed.

User mistakes (``VQCError``) print one line and exit 2; nothing half-written is left behind.
"""

from __future__ import annotations

import glob
import json
import logging
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
import typer
from tqdm.auto import tqdm

from .errors import VQCError
from .notes import say

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Make neural networks many times smaller with codebooks, and run them.")

DEMO_OUTPUT = Path("out/minilm-2bit.vqc")
CODEBOOKS_HELP = "a folder holding universal codebooks (repeatable; also searched: beside the file, $VQC_CODEBOOKS)"


def _device(name: str) -> str:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise VQCError(f"--device {name} asked for, but no CUDA device is available here")
    if not (name == "cpu" or name.startswith("cuda")):
        raise VQCError(f"--device must be cpu or cuda[:N], got {name!r}")
    return name


def _peak_memory_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _say(message: str, quiet: bool = False) -> None:
    if not quiet:
        typer.echo(message, err=True)


def _settings_summary(model) -> list[str]:
    """One line per distinct recipe, so a user sees which (d, k) a budget picked."""
    from .layers import iter_coded

    counts: dict[str, int] = {}
    for _, layer in iter_coded(model):
        recipe = ", ".join(f"{k}={v}" for k, v in layer.weight_code.recipe.items())
        counts[recipe] = counts.get(recipe, 0) + 1
    return [f"{n} layer(s): {recipe}" for recipe, n in counts.items()]


@app.command()
def compress(
    model: str = typer.Argument(..., help="bundled model (minilm), zoo model (fashion-cnn, fashion-vit) or a transformers model folder"),
    output: Path = typer.Option(..., "-o", "--output", help="the .vqc file to write"),
    method: str = typer.Option("kmeans", help="rtn, kmeans, vqdnn, jlcm, vq4all or qswd"),
    codebook: Optional[Path] = typer.Option(None, help="vq4all: the universal codebook file (.vqcb)"),
    bits: Optional[float] = typer.Option(None, help="bit budget per weight; picks the method's settings"),
    dim: Optional[int] = typer.Option(None, help="kmeans: sub-vector length d (overrides the budget's)"),
    k: Optional[int] = typer.Option(None, help="kmeans: codewords per codebook (overrides the budget's)"),
    scale: Optional[str] = typer.Option(None, help="kmeans: 'row' divides each row by its RMS first"),
    groups: Optional[int] = typer.Option(None, help="kmeans: codebooks per layer (blocks of rows)"),
    group_size: Optional[int] = typer.Option(None, help="rtn: inputs per scale/offset group"),
    shared_codebooks: Optional[int] = typer.Option(
        None, help="kmeans/vqdnn: N codebooks per sub-vector layout for the whole model, each shared by a run of "
                   "layers with a per-layer gain (VQ-DNN's group number)"),
    option: list[str] = typer.Option([], "--option", "-O", help="a method option as KEY=VALUE (repeatable), e.g. "
                                     "jlcm's gradient=proximal|soft|ste, grouping=stats|none, steps=100"),
    calib: Optional[str] = typer.Option(None, help="calibration data: a corpus (lee-background, wiki, fashion) or a "
                                                   "UTF-8 text file (default: the model's own corpus); every layer is "
                                                   "fitted to its inputs and --bits is the whole file's average"),
    data_free: bool = typer.Option(False, "--data-free", help="no calibration: each layer fitted to its weights "
                                                              "alone, --bits each layer's ceiling (seconds)"),
    calib_samples: Optional[int] = typer.Option(None, help="calibration sentences, token windows or images"),
    per_layer_bits: bool = typer.Option(False, help="with calibration: --bits caps every layer's own index bits "
                                                    "(its codebooks and scales come on top; qswd counts them in the cap) "
                                                    "instead of being the whole model's average"),
    skip: list[str] = typer.Option([], help="regex of layer names to leave dense (repeatable)"),
    include: list[str] = typer.Option([], help="regex of layer names to code even when small (repeatable)"),
    layer: list[str] = typer.Option([], "--layer", "-L", help="NAME_REGEX:KEY=VALUE[,KEY=VALUE…]: options for the "
                                    "layers the regex names (repeatable), e.g. 'model\\.embed_tokens:bits=4' pins "
                                    "that layer's budget (the others share the rest)"),
    finetune_steps: Optional[int] = typer.Option(None, help="distil from the original for N steps on the model's "
                                                            "training data (default 0; vqdnn: by the model's size)"),
    finetune_lr: Optional[float] = typer.Option(None, "--finetune-lr", "--lr", help="fine-tuning learning rate "
                                                "(default: 10⁻³, 10⁻⁴ for models of 100 M parameters and more; a "
                                                "method's own rate, e.g. jlcm's, is -O lr=…)"),
    tune_dense: bool = typer.Option(True, help="fine-tuning also tunes norms, biases and layers left dense"),
    keep_rows: Optional[int] = typer.Option(None, help="each token embedding also stores its N most used rows (by "
                                                       "the calibration text) apart, in int8 with a scale per row "
                                                       "(default: chosen for a large tied token table, else 0)"),
    tune_blocks: Optional[int] = typer.Option(None, help="with calibration: train each block's codebooks and scales "
                                                         "for N passes over the calibration data to give the original "
                                                         "block's outputs (default: 1 for causal LMs, else 0)"),
    assignments: Optional[str] = typer.Option(None, help="how fine-tuning learns assignments: 'ste' (straight-through, "
                                                         "periodic nearest-codeword refresh), 'soft' (annealed "
                                                         "temperature) or 'progressive' (candidates frozen as they "
                                                         "become sure); default: the method's own"),
    seed: int = typer.Option(0, help="seed: same inputs and seed, same file"),
    device: str = typer.Option("cpu", help="cpu, or cuda when present"),
    json_out: bool = typer.Option(False, "--json", help="print a JSON result instead of the table"),
    quiet: bool = typer.Option(False, help="no progress bars"),
) -> None:
    """Compress a model into a .vqc file and print its bit report."""
    from . import save
    from .atomic import check_writable
    from .budget import PerLayer, checked_bits
    from .compress import compress_with_summary
    from .defaults import calibration_samples
    from .memory import map_large_blocks
    from .models import load_model
    from .plan import Plan, left_dense_lines

    started = time.perf_counter()
    device = _device(device)
    check_writable(output)
    budget = None if bits is None else (PerLayer if per_layer_bits else checked_bits)(bits)
    map_large_blocks()  # a lower peak for a slower fit: see there
    options = {key: value for key, value in
               {"dim": dim, "k": k, "scale": scale, "groups": groups, "group_size": group_size,
                "shared": shared_codebooks, "codebook": codebook and str(codebook)}.items() if value is not None} \
        | _key_values(option)
    plan = Plan(by_name={**{pattern: {} for pattern in include}, **{pattern: None for pattern in skip}})
    _say(f"loading {model} …", quiet)
    dense, source = load_model(model, seed)
    for pattern, spec in [*kept_rows_plan(dense, keep_rows).items(), *layer_plan(layer).items()]:
        plan.by_name[pattern] = {**(plan.by_name.get(pattern) or {}), **spec}
    if data_free and (calib or calib_samples or tune_blocks):
        raise VQCError("--data-free goes without --calib, --calib-samples and --tune-blocks")
    calibration = None if data_free and not finetune_steps else _calibration(
        source.to_json(), seed, calib, calib_samples or calibration_samples(dense), bool(finetune_steps))
    checkpoint = output.with_name(f".{output.name}.partial")  # work so far, resumed from if found
    with _said_if_interrupted(output):
        compressed, summary = compress_with_summary(
            dense.to(device), method, budget, calibration, plan=plan, seed=seed, progress=not quiet,
            finetune_steps=finetune_steps, finetune_lr=finetune_lr, assignments=assignments, checkpoint=checkpoint,
            tune_dense=tune_dense, tune_blocks=tune_blocks, calibrate=False if data_free else None, **options)
    save(compressed, output, source)
    settings = _settings_summary(compressed)
    _say_written(output, started, json_out, {"settings": settings, "allocation": summary.allocation,
                                             "left_dense": [vars(entry) for entry in summary.left_dense]},
                 [*([] if summary.allocation is None else [summary.allocation]), *settings,
                  *left_dense_lines(summary.left_dense)])


@contextmanager
def _said_if_interrupted(output: Path) -> Iterator[None]:
    """On Ctrl-C (or SIGTERM: ``main``), say what the run keeps beside ``output``: its checkpoints,
    hidden files, each with its size, and how to go on."""
    try:
        yield
    except KeyboardInterrupt:
        kept = [path for path in sorted(output.parent.glob(glob.escape(f".{output.name}.partial") + "*"))
                if path.is_file() and not path.name.endswith(".tmp")]
        for path in kept:
            say(f"interrupted: the work so far is kept in {path} (a hidden file, {path.stat().st_size / 2**20:.1f} MiB); "
                "the same command resumes from it, or delete it")
        if not kept:
            say("interrupted: nothing was kept")
        raise


def _calibration(source: dict, seed: int, calib: str | None, samples: int | None, needed: bool):
    """The model's calibration data; where none is known and none was asked for, a data-free run
    (said), not a failure."""
    from .data import NoData, training_data

    try:
        return training_data(source, seed, calib, samples)
    except NoData as error:
        if calib or needed:
            raise
        say(f"{error}; compressing data-free")
        return None


def _say_written(output: Path, started: float, json_out: bool, extra: dict, lines: list[str]) -> None:
    """The written file's bit report (after ``lines``), time and peak memory; or all that as JSON."""
    from . import report

    seconds, result = time.perf_counter() - started, report(output)
    if json_out:
        typer.echo(json.dumps({"output": str(output), "seconds": seconds, "peak_memory_mib": _peak_memory_mib(),
                               **extra, **result.to_json()}, indent=1))
        return
    typer.echo("\n".join([*lines, str(result)]))
    typer.echo(f"wrote {output} in {seconds:.1f} s (peak memory {_peak_memory_mib():.0f} MiB)")


@app.command("finetune")
def finetune_file(
    file: Path,
    output: Path = typer.Option(..., "-o", "--output", help="the .vqc file to write (may be FILE itself)"),
    steps: int = typer.Option(..., help="distillation steps, each one batch of the model's training data"),
    lr: Optional[float] = typer.Option(None, "--lr", "--finetune-lr", help="fine-tuning learning rate (default: "
                                                                         "10⁻³, 10⁻⁴ for models of 100 M parameters "
                                                                         "and more)"),
    calib: Optional[str] = typer.Option(None, help="training data: a corpus (lee-background, wiki, fashion) or a UTF-8 "
                                                   "text file (default: the model's own)"),
    calib_samples: Optional[int] = typer.Option(None, help="sentences, token windows or images to draw batches from"),
    tune_dense: bool = typer.Option(True, help="also train what is stored dense (norms, biases, layers left dense)"),
    seed: int = typer.Option(0, help="seed: same inputs and seed, same file"),
    device: str = typer.Option("cpu", help="cpu, or cuda when present"),
    json_out: bool = typer.Option(False, "--json", help="print a JSON result instead of the table"),
    quiet: bool = typer.Option(False, help="no progress bar"),
) -> None:
    """Fine-tune a .vqc file further: distil it from the model it was made from, its codes fixed
    (codebooks, scales and what is stored dense train), and write it with its bit report."""
    from . import save
    from .atomic import check_writable
    from .data import training_data
    from .defaults import finetune_settings
    from .finetune import finetune
    from .io import load, read_manifest
    from .models import original_model
    from .source import Source

    device = _device(device)
    started = time.perf_counter()
    check_writable(output)
    student = load(file, device=device)
    source = Source(**read_manifest(file)[0]["source"])
    teacher = original_model(source.to_json()).to(device)
    default_lr, windows = finetune_settings(teacher)
    data = training_data(source.to_json(), seed, calib, calib_samples, limit=windows)
    run = f"{read_manifest(file)[0]['payload_sha256']}|{seed}|{calib}|{calib_samples}"  # what its checkpoint is of
    with _said_if_interrupted(output):
        finetune(student, teacher, data.task, data.batch_at, steps, lr=lr or default_lr, progress=not quiet,
                 tune_dense=tune_dense, checkpoint=output.with_name(f".{output.name}.partial.finetune"), run=run)
    save(student, output, source)
    _say_written(output, started, json_out, {}, [])


def kept_rows_plan(model: torch.nn.Module, rows: int | None) -> dict[str, dict]:
    """``--keep-rows``: plan entries that give every token embedding with more than ``rows`` rows
    (and coded anyway: as large as the plan's smallest) that many kept rows; a position or segment
    table of fewer rows is left as it is. ``--keep-rows 0`` names them too, so that no default
    keeps rows there."""
    from .plan import Plan

    if rows is None:
        return {}
    return {re.escape(name): {"keep_rows": rows} for name, module in model.named_modules()
            if isinstance(module, torch.nn.Embedding) and module.num_embeddings > rows
            and module.weight.numel() >= Plan().min_weights}


def layer_plan(entries: list[str]) -> dict[str, dict]:
    """``--layer NAME_REGEX:KEY=VALUE,…``: plan entries by layer name (a bad regex is the user's
    mistake, said in one line)."""
    plan = {}
    for entry in entries:
        pattern, sep, pairs = entry.rpartition(":")
        if not sep or not pattern or not pairs:
            raise VQCError(f"--layer takes NAME_REGEX:KEY=VALUE[,KEY=VALUE…], got {entry!r}")
        try:
            re.compile(pattern)
        except re.error as error:
            raise VQCError(f"--layer {entry!r}: {pattern!r} is not a regular expression ({error})") from None
        plan[pattern] = {**plan.get(pattern, {}), **_key_values(pairs.split(","), "--layer")}
    return plan


def _key_values(pairs: list[str], flag: str = "--option") -> dict:
    """KEY=VALUE options, numbers as numbers."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise VQCError(f"{flag} takes KEY=VALUE, got {pair!r}")
        for kind in (int, float):
            try:
                value = kind(value)
                break
            except ValueError:
                pass
        options[key] = value
    return options


@app.command()
def inspect(file: Path, json_out: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Per-layer table and totals of a .vqc file: bits per weight, measured from what is stored."""
    from .io import read
    from .report import report

    read(file)  # checks the payload's sha256 before reporting on it
    result = report(file)
    typer.echo(json.dumps(result.to_json(), indent=1) if json_out else str(result))


@app.command("eval")
def evaluate(
    file: Path,
    suite: Optional[str] = typer.Option(None, help="quality suite (default: the one for the file's source model)"),
    device: str = typer.Option("cpu", help="cpu, or cuda when present"),
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
    codebooks: list[Path] = typer.Option([], help=CODEBOOKS_HELP),
    tokens: Optional[int] = typer.Option(None, help="gemma-270m: score the first N tokens of the text (default "
                                                    "2,048, the suite's protocol; more tells close files apart)"),
) -> None:
    """Quality of a compressed model against its uncompressed source, on real data."""
    from .io import load, read_manifest
    from .suites import run_suite

    device = _device(device)
    model = load(file, device=device, codebooks=codebooks)
    figures = run_suite(suite, model, read_manifest(file)[0]["source"], device, tokens)
    typer.echo(json.dumps(figures, indent=1) if json_out else figures.pop("table"))


@app.command()
def decompress(file: Path, output: Path = typer.Option(..., "-o", "--output", help="folder to write"),
               codebooks: list[Path] = typer.Option([], help="folder holding universal codebooks (repeatable)")) -> None:
    """Write a plain model folder (dense safetensors + config) that transformers loads."""
    from .io import load, read_manifest
    from .layers import densify
    from .models import model_folder

    model = densify(load(file, codebooks=codebooks))
    if output.exists() and any(output.iterdir()):
        raise VQCError(f"{output} exists and is not empty; choose a new folder")
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent if output.parent.exists() else None))
    try:
        source_folder = model_folder(read_manifest(file)[0]["source"])
        if source_folder is not None:  # tokenizer, pooling config …: everything but the weights
            shutil.copytree(source_folder, staging, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.gguf", ".git*"))
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(staging)
        else:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(staging / "model.safetensors"))
        if output.exists():
            output.rmdir()
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    typer.echo(f"wrote {output}")


def demo_commands(output: Path, device: str) -> list[list[str]]:
    """The demo's two commands, exactly as a user would type them (so they parse like theirs)."""
    return [["compress", "minilm", "-o", str(output), "--method", "jlcm", "--bits", "2.1", "--device", device],
            ["eval", str(output), "--suite", "minilm", "--device", device]]


@app.command()
def demo(output: Path = typer.Option(DEMO_OUTPUT, "-o", "--output"), device: str = typer.Option("cpu")) -> None:
    """The main job on the bundled MiniLM: jlcm at 2.1 bits per weight for the whole model
    (calibrated on Lee background sentences), bit report, quality."""
    for i, command in enumerate(demo_commands(output, device)):
        typer.echo(("\n" if i else "") + "$ vqc " + " ".join(command))
        app(command, standalone_mode=False)


zoo = typer.Typer(help="The small models trained in the project (Fashion-MNIST).", no_args_is_help=True)
app.add_typer(zoo, name="zoo")


@zoo.command("train")
def zoo_train(name: str, seed: int = typer.Option(0, help="training seed: same seed, same weights")) -> None:
    """Train a zoo model deterministically on the CPU and cache it (minutes)."""
    from .models.fashion import train

    path = train(name, seed)
    info = json.loads(path.with_suffix(".json").read_text())
    typer.echo(f"{name}: test accuracy {100 * info['test_accuracy']:.2f}% after {info['epochs']} epochs "
               f"in {info['seconds']:.0f} s; cached at {path}")


books = typer.Typer(help="Universal codebooks (VQ4ALL): one codebook for every layer of many networks.",
                    no_args_is_help=True)
app.add_typer(books, name="codebook")


@books.command("build")
def codebook_build(
    models: list[str] = typer.Argument(..., help="source models: bundled names, zoo names or model folders"),
    output: Path = typer.Option(..., "-o", "--output", help="the .vqcb file to write"),
    dim: int = typer.Option(4, help="sub-vector length d"),
    k: int = typer.Option(256, help="codewords (2 bits per weight of indices at d = 4, k = 256)"),
    samples: int = typer.Option(4096, help="normalised sub-vectors drawn from every layer"),
    bandwidth: str = typer.Option("scott", help="kernel bandwidth rule: scott or silverman"),
    placement: str = typer.Option("lloyd", help="codewords at the density's Lloyd centroids, or 'sample'd from it"),
    seed: int = typer.Option(0),
) -> None:
    """Extract a universal codebook from source models by kernel density estimation."""
    from . import universal
    from .models import load_model

    sources = {}
    for name in models:
        _say(f"loading {name} …")
        sources[name] = load_model(name, seed)[0]
    book = universal.save_codebook(universal.build(sources, dim, k, samples, bandwidth, placement, seed), output)
    typer.echo(f"wrote {output}: {book.describe()}, sha256 {book.sha256}, {output.stat().st_size:,} bytes")
    for source in book.info["sources"]:
        skipped = f" ({len(source['skipped'])} skipped: d does not divide their inputs)" if source["skipped"] else ""
        typer.echo(f"  {source['model']}: {source['layers']} layers × {samples} sub-vectors{skipped}")


@books.command("inspect")
def codebook_inspect(
    file: Path,
    png: Optional[Path] = typer.Option(None, help="also draw the codewords (2-D projection) to this PNG"),
    over: Optional[str] = typer.Option(None, help="with --png: draw them over this model's weight density"),
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Size, identity and sources of a universal codebook; optionally a picture of it."""
    from . import universal

    book = universal.load_codebook(file)
    if json_out:
        typer.echo(json.dumps({"sha256": book.sha256, "bytes": file.stat().st_size, **book.info}, indent=1))
    else:
        typer.echo(f"{book.describe()}\nsha256  : {book.sha256}\nsize    : {file.stat().st_size:,} bytes "
                   f"({book.k} × {book.dim} fp16 codewords)")
        for source in book.info.get("sources", []):
            typer.echo(f"source  : {source['model']} ({source['layers']} layers)")
        if "bandwidth" in book.info:  # extracted, not made by a rule (``universal.RULES``)
            typer.echo(f"density : Gaussian KDE, {book.info['bandwidth']} bandwidth, {book.info.get('samples_per_layer')} "
                       f"samples per layer, codewords by {book.info.get('placement')}")
    if png is not None:
        points = None
        if over is not None:
            import torch

            from .models import load_model

            layers = universal.source_layers(load_model(over)[0], book.dim)[0]
            points = universal.sample_subvectors([w for _, w in layers], book.dim, 2000, torch.Generator().manual_seed(0))
        universal.plot(book, png, points)
        typer.echo(f"wrote {png}")


@app.command("bench-speed")
def bench_speed(
    file: Path,
    repeats: int = typer.Option(20, help="timed calls per measurement (the median is reported)"),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: torch's)"),
    tokens: int = typer.Option(32, help="causal LMs: new tokens per generation"),
    batch: list[int] = typer.Option([1], help="batch sizes for the per-layer times (repeatable)"),
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
    codebooks: list[Path] = typer.Option([], help=CODEBOOKS_HELP),
) -> None:
    """Latency per layer and of the whole model, tokens/s (causal LMs) and resident memory: the coded
    model (compiled lookup-table kernel) against its dense fp32 twin, medians of repeats."""
    from .io import load
    from .speed import bench_speed as measure
    from .speed import check_settings

    check_settings(repeats, tuple(batch), tokens, threads)
    result = measure(load(file, codebooks=codebooks), repeats, tuple(batch), tokens, threads)
    typer.echo(json.dumps(result.to_json(), indent=1) if json_out else str(result))


class _BesideBars(logging.Handler):
    """What a run says aloud (``notes``), on stderr between its progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(record.getMessage(), file=sys.stderr)


def main() -> None:
    """Entry point: user mistakes become one line on stderr and exit code 2."""
    from .notes import logger

    logger.addHandler(_BesideBars())
    logger.propagate = False
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a stopped run cleans up and says what it keeps, as at Ctrl-C
    try:
        app()
    except VQCError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)
