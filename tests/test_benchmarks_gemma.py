"""The Gemma bench's own logic: every configuration is a command line the CLI accepts, and the
section renders each row against the dense model."""

from typer.testing import CliRunner

from benchmarks.gemma import CONFIGS, FINETUNED
from benchmarks.render import gemma_markdown


def test_every_configuration_is_a_valid_command_line(monkeypatch):
    """Parsed by the real CLI up to the model load (stopped there), so a typo fails here, not an hour in."""
    from vqcompress import cli, models

    def stop(*args, **kwargs):
        raise SystemExit(7)

    monkeypatch.setattr(models, "load_model", stop)
    for args in CONFIGS.values():
        result = CliRunner().invoke(cli.app, ["compress", "gemma-270m", *args, "-o", "x.vqc", "--quiet"])
        assert result.exit_code == 7, (args, result.output)


def test_every_fine_tuned_row_starts_from_a_row_and_is_a_valid_command_line(monkeypatch):
    from vqcompress import cli, io

    def stop(*args, **kwargs):
        raise SystemExit(7)

    monkeypatch.setattr(io, "load", stop)
    for base, args in FINETUNED.values():
        assert base in CONFIGS
        result = CliRunner().invoke(cli.app, ["finetune", "x.vqc", *args, "-o", "y.vqc", "--quiet"])
        assert result.exit_code == 7, (args, result.output)


def test_rows_render_against_the_dense_model():
    """Both perplexities against the dense model's; a row scored before the longer text was has dashes."""
    machine = {"cpu": "AMD EPYC"}
    row = {"label": "a", "args": ["--method", "kmeans"], "model_bits_per_weight": 2.5, "coded_bits_per_weight": 2.4,
           "perplexity": 60.0, "seconds": 600, "peak_memory_mib": 3000, "machine": machine,
           "date": "2026-11-26T06:00:00+00:00"}
    result = {"dense": {"perplexity": 40.0, "perplexity_long": 50.0, "weight_bytes": 2**30},
              "rows": [row, {**row, "label": "b", "perplexity_long": 80.0}]}
    text = "\n".join(gemma_markdown(result))
    assert "| a | `--method kmeans` | 2.500 | 2.400 | 60.00 | 1.50× | — | — | 10.0 min | 3,000 MiB |" in text
    assert "| b | `--method kmeans` | 2.500 | 2.400 | 60.00 | 1.50× | 80.00 | 1.60× | 10.0 min | 3,000 MiB |" in text
    assert "perplexity 40.00 (50.00 on 16,384 tokens)" in text and "1,024 MiB" in text


def test_peers_render_beside_our_rows_that_code_the_same_layers():
    """The side-by-side table holds the "Linear layers only" rows and the peers, nothing else."""
    machine = {"cpu": "AMD EPYC"}
    common = {"model_bits_per_weight": 12.0, "coded_bits_per_weight": 2.1, "perplexity": 80.0,
              "perplexity_long": 100.0, "peak_memory_mib": 2000, "machine": machine, "date": "2026-11-26T06:00:00+00:00"}
    ours = {**common, "label": "jlcm, Linear layers only (embedding dense)", "args": ["--method", "jlcm"], "seconds": 600}
    other = {**common, "label": "qswd 3.0 bits", "args": ["--method", "qswd"], "seconds": 600}
    peer = {**common, "label": "HQQ 2 bits, group 64", "args": ["peer=hqq"], "coded_bits_per_weight": 3.0,
            "perplexity": 4000.0, "perplexity_long": 5000.0, "seconds": 30}
    result = {"dense": {"perplexity": 40.0, "perplexity_long": 50.0, "weight_bytes": 2**30},
              "rows": [ours, other], "peers": [peer]}
    table = "\n".join(gemma_markdown(result)).split("### Side by side")[1]
    assert "| vqcompress | jlcm, Linear layers only (embedding dense) | 2.100 | 80.00 | 2.00× | 100.00 | 2.00× | 10.0 min |" in table
    assert "| peer | HQQ 2 bits, group 64 | 3.000 | 4,000.00 | 100.00× | 5,000.00 | 100.00× | 30 s | 2,000 MiB |" in table
    assert "qswd 3.0 bits" not in table
