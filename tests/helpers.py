"""Helpers shared by several test modules (fixtures live in conftest.py, tiny models in tiny_models.py)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from streamprune.cli import main

REPO = Path(__file__).resolve().parents[1]
# `streamprune run` flags for a fast, deterministic run on a tiny model, and the same as prune() options.
FAST = ["--nsamples", "4", "--seqlen", "16", "--quiet", "--dtype", "float32"]
FAST_OPTIONS = {"nsamples": 4, "seqlen": 16, "dtype": "float32"}


def folder_digest(path: Path) -> str:
    """Names and bytes of every file under `path`: equal digests mean the folder is unchanged."""
    return _digest(path, lambda f: True)


def output_digest(path: Path) -> str:
    """Like folder_digest, without the report (it holds timings and memory figures)."""
    return _digest(path, lambda f: f.name != "streamprune_report.json")


def _digest(path: Path, keep) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and keep(p)):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def run_cli(args: list[str]):
    """`streamprune run ARGS` in this process (click's CliRunner)."""
    return CliRunner().invoke(main, ["run", *args])


def run_cli_process(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    """`python -m streamprune run ARGS` in a child process, with a fault point (faults.py) when given."""
    env = dict(os.environ)
    env.pop("STREAMPRUNE_FAULT", None)
    if fault:
        env["STREAMPRUNE_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "streamprune", "run", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def assert_clean_failure(result, message: str) -> None:
    """A failed command: non-zero exit, `message` in its output, no traceback, at most three lines."""
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) <= 3
