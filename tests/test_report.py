"""`streamprune report`: table and PNG from a run report."""

from __future__ import annotations

from click.testing import CliRunner

from streamprune.cli import main


def test_report_renders_table_and_png(pruned, tmp_path):
    out = pruned("llama-gqa", 0.3).out_dir
    result = CliRunner().invoke(main, ["report", str(out), "--png", str(tmp_path / "r.png")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["layer", "cosine", "ratio"]
    assert sum(1 for line in lines if line.strip().split(" ")[0].isdigit()) == 4  # one row per layer
    assert "removed, target 30.00%" in result.output
    png = (tmp_path / "r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_report_on_a_folder_without_report(tmp_path):
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "has no streamprune_report.json" in result.output
