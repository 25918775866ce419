"""`streamprune run` through the command line."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from streamprune.cli import main
from streamprune.engine import PruneOptions


def test_run_prints_a_summary_and_writes_the_model(models, calib_file, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(models("llama-gqa")), str(out), "--ratio", "0.2", "--calib",
                                       str(calib_file), "--nsamples", "4", "--seqlen", "16", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "removed, target 20.00%" in result.output
    assert "calibration: file calib.txt (" in result.output and ", 4 x 16 tokens" in result.output
    assert (out / "config.json").is_file()


def test_run_help_documents_every_option():
    """Every schema option is a flag of `run` and appears in --help with its help text's start; every other
    option of `run` (its own: --paper, --overwrite, ...) has help text there too. Both lists come from the
    code (the options schema, the click command), so a new option is checked without editing this test."""
    import re

    import click

    from streamprune.options import cli_flag, fields, info

    run = main.commands["run"]
    help_text = " ".join(CliRunner().invoke(main, ["run", "--help"]).output.split())
    shown = set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", help_text))  # whole flags, not prefixes of others
    options = [p for p in run.params if isinstance(p, click.Option)]
    flags = {flag for p in options for flag in p.opts + p.secondary_opts if flag.startswith("--")}
    for f in fields():
        assert cli_flag(f) in flags, f"{cli_flag(f)} is in the options schema but not an option of run"
        assert " ".join(info(f).help.split()[:3]) in help_text, f.name
    assert flags <= shown, sorted(flags - shown)
    assert all(p.help for p in options), [p.name for p in options if not p.help]


def test_paper_preset_selects_the_published_method_and_explicit_options_win(models, calib_file, tmp_path):
    import streamprune

    base = ["run", str(models("llama-gqa")), "--ratio", "0.2", "--calib", str(calib_file), "--seqlen", "16",
            "--quiet"]
    result = CliRunner().invoke(main, [*base[:1], *base[1:2], str(tmp_path / "paper"), *base[2:], "--paper"])
    assert result.exit_code == 0, result.output
    options = streamprune.read_report(tmp_path / "paper")["options"]
    assert (options["recovery"], options["selection"], options["nsamples"]) == ("affine", "slimllm", 32)
    result = CliRunner().invoke(main, [*base[:2], str(tmp_path / "mixed"), *base[2:], "--paper", "--nsamples", "4",
                                       "--recovery", "lstsq"])
    assert result.exit_code == 0, result.output
    options = streamprune.read_report(tmp_path / "mixed")["options"]
    assert (options["recovery"], options["nsamples"]) == ("lstsq", 4)
    default = PruneOptions(ratio=0.2)
    assert (default.recovery, default.nsamples) == ("lstsq", 128)


def test_bad_method_options_are_one_line_errors(models, calib_file, tmp_path):
    for args, message in ((["--damping", "0"], "--damping must be above 0"),
                          (["--protect-lowest", "1"], "--protect-lowest must be at least 0 and below 1")):
        result = CliRunner().invoke(main, ["run", str(models("llama-gqa")), str(tmp_path / "o"), "--ratio", "0.2",
                                           "--calib", str(calib_file), "--nsamples", "4", "--seqlen", "16", *args])
        assert result.exit_code != 0 and message in result.output
        assert "Traceback" not in result.output and not (tmp_path / "o").exists()


def test_default_calibration_offline_fails_fast_naming_builtin(models, tmp_path, monkeypatch):
    """`run MODEL OUT --ratio 0.2` with the default --calib (a datasets spec) and no Hub: one line naming
    --calib builtin, at once, and no OUT_DIR."""
    import time

    import datasets
    import huggingface_hub

    from streamprune import calibration

    monkeypatch.setattr(calibration, "hub_reachable", lambda: pytest.fail("probed the Hub in offline mode"))
    for offline in (True, False):  # HF_HUB_OFFLINE set; then online but the Hub does not answer
        monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1" if offline else "0")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", offline)
        if not offline:
            monkeypatch.setattr(calibration, "hub_reachable", lambda: False)
        started = time.perf_counter()
        result = CliRunner().invoke(main, ["run", str(models("llama-gqa")), str(tmp_path / "o"), "--ratio", "0.2"])
        assert time.perf_counter() - started < 20
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: cannot ")
        assert "wikitext:wikitext-2-raw-v1:train" in lines[0] and "--calib builtin" in lines[0]
        assert not (tmp_path / "o").exists()
