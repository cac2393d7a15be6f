"""The Gemma bench's own logic: every configuration is a command line the CLI accepts, and the
section renders each row against the dense model."""

from typer.testing import CliRunner

from benchmarks.gemma import CONFIGS
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
