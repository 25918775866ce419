"""`streamprune demo` end to end on a tiny model (the real SmolLM2 fetch is exercised by benchmarks)."""

from __future__ import annotations

from click.testing import CliRunner

from streamprune.cli import main


def test_demo_runs_end_to_end_on_a_tiny_model(models, tmp_path):
    result = CliRunner().invoke(main, ["demo", "--model-dir", str(models("llama-gqa")), "--cache-dir",
                                       str(tmp_path), "--nsamples", "4", "--seqlen", "16", "--quiet"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    dense = next(line for line in lines if line.startswith("dense "))
    pruned = next(line for line in lines if line.startswith("pruned 20%"))
    assert float(dense.split()[2]) > 1 and float(pruned.split()[3]) > 1  # perplexities
    achieved = float(result.output.split("achieved ratio ")[1].split("%")[0])
    assert abs(achieved - 20) <= 0.5
    assert (tmp_path / "demo" / "llama-gqa-pruned-20" / "config.json").is_file()
    assert sum(line.startswith(("dense:", "pruned:")) or ": The most important" in line for line in lines) == 2
