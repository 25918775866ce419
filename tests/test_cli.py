"""`streamprune run` through the command line."""

from __future__ import annotations

from click.testing import CliRunner

from streamprune.cli import main


def test_run_prints_a_summary_and_writes_the_model(models, calib_file, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(models("llama-gqa")), str(out), "--ratio", "0.2", "--calib",
                                       str(calib_file), "--nsamples", "4", "--seqlen", "16", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "removed, target 20.00%" in result.output
    assert (out / "config.json").is_file()


def test_run_help_documents_every_option():
    result = CliRunner().invoke(main, ["run", "--help"])
    for option in ("--ratio", "--calib", "--nsamples", "--seqlen", "--seed", "--device", "--dtype", "--alpha",
                   "--no-greedy", "--no-feature-space", "--uniform", "--no-regression", "--quiet", "--gqa-mode"):
        assert option in result.output
