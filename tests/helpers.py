"""Helpers shared by several test modules (fixtures live in conftest.py, tiny models in tiny_models.py)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
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


def run_to_the_end(args: list[str]) -> None:
    """`python -m streamprune run ARGS` in a child process, which must succeed."""
    result = run_cli_process(args)
    assert result.returncode == 0, result.stderr


def kill_then_resume(src: str, out: Path, args: list[str], fault: str) -> None:
    """`streamprune run SRC OUT ARGS` killed with SIGKILL at `fault` (faults.py), which must leave no OUT_DIR
    (nothing that looks like a finished model), then the same command again, which must resume to the end."""
    killed = run_cli_process([src, str(out), *args], fault)
    assert killed.returncode == -9, killed.stderr
    assert not out.exists()
    run_to_the_end([src, str(out), *args])


def assert_killed_run_resumes_to_a_clean_runs_bytes(src: str, args: list[str], fault: str, tmp_path: Path) -> None:
    """A run killed at `fault` and resumed writes exactly the bytes of the same run never interrupted."""
    run_to_the_end([src, str(tmp_path / "clean"), *args])
    kill_then_resume(src, tmp_path / "out", args, fault)
    assert output_digest(tmp_path / "out") == output_digest(tmp_path / "clean")


def invoke_cli(*args: object):
    """`streamprune ARGS` in this process (click's CliRunner); paths and numbers may be given as they are."""
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_error_line(result, message: str) -> None:
    """A failed command whose output holds `message`, no traceback, and exactly one `error:` line."""
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1


def greedy_tokens(model_dir: Path, ids: list[int], n: int) -> list[int]:
    """`n` tokens greedily generated after `ids` by the folder's model in float32 (streamprune's own loader)."""
    import torch

    from streamprune.loading import load_pruned

    model = load_pruned(model_dir, dtype=torch.float32)
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


def checkpoint_reads(monkeypatch, action: Callable[[], object]) -> list[list[str]]:
    """Run `action` and return the tensor names of every CheckpointReader.read it made, in order."""
    from streamprune.checkpoint import CheckpointReader

    reads: list[list[str]] = []
    real = CheckpointReader.read

    def recording(self, names):
        reads.append(list(names))
        return real(self, names)

    monkeypatch.setattr(CheckpointReader, "read", recording)
    action()
    return reads


def layers_in(names: list[str]) -> set[str]:
    """The decoder layers ('0', '1', ...) that tensor names belong to: one for a streamed layer read, none for
    the embedding, the final norm or the head."""
    return {n.split(".")[2] for n in names if n.startswith("model.layers.")}


def write_csv(path: Path, header: str, *rows: str) -> Path:
    """A manifest (or any CSV file): the header line, then one line per row."""
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def assert_manifest_refused(folder: Path, header: str, rows: str, message: str) -> None:
    """A jobs.csv of `header` and `rows` in `folder` fails to load with an error matching `message`."""
    import pytest

    from streamprune.batch import load_manifest
    from streamprune.errors import StreamPruneError

    with pytest.raises(StreamPruneError, match=message):
        load_manifest(write_csv(folder / "jobs.csv", header, rows))


def assert_batch_exports_each_job_once(manifest: Path, export: Path, check_export: Callable[[Path], None]) -> None:
    """A two-job manifest whose first job also exports to `export` (a GGUF file or a DeciLM folder): both jobs
    run and the export is written; with the export gone a rerun only writes it again; then both are skipped."""
    from streamprune.batch import BatchSettings, run_batch

    def statuses() -> list[str]:
        summary = run_batch(manifest, BatchSettings(no_shared_cache=True))
        return [job["status"] for job in summary["jobs"]]

    assert statuses() == ["ok", "ok"]
    check_export(export)
    if export.is_dir():
        shutil.rmtree(export)
    else:
        export.unlink()
    assert statuses() == ["ok", "skipped"]  # job 1: only the export ran (its model was already pruned)
    check_export(export)
    assert statuses() == ["skipped", "skipped"]


def assert_clean_failure(result, message: str) -> None:
    """A failed command: non-zero exit, `message` in its output, no traceback, at most three lines."""
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) <= 3
