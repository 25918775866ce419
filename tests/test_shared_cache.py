"""The shared calibration cache: one key, and a lock that makes concurrent runs compute an entry once."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamprune import shared_cache
from streamprune.checkpoint import CheckpointReader
from streamprune.engine import model_fingerprint, prune
from streamprune.options import PruneOptions
from tests.helpers import FAST_OPTIONS

ROOT = Path(__file__).resolve().parent.parent


def test_key_is_unchanged_so_existing_caches_stay_valid():
    options = PruneOptions(ratio=0.5, calib="calib.txt", nsamples=4, seqlen=16)
    assert shared_cache.entry_key("0123456789abcdef", options, "cpu", "torch.float32") == "e5ddd5a30d11549c"
    # The ratio and the method are not part of the key; the calibration settings and the dtype are.
    other_method = PruneOptions(ratio=0.2, calib="calib.txt", nsamples=4, seqlen=16, greedy=False, recovery="affine")
    assert shared_cache.entry_key("0123456789abcdef", other_method, "cpu", "torch.float32") == "e5ddd5a30d11549c"
    assert shared_cache.entry_key("0123456789abcdef", options, "cpu", "torch.float16") != "e5ddd5a30d11549c"


def test_the_engine_reports_the_key_of_the_entry_it_used(models, calib_file, tmp_path):
    model = models("llama-mha")
    result = prune(model, tmp_path / "out", 0.3, calib=str(calib_file), shared_cache=tmp_path / "cache", quiet=True,
                   **FAST_OPTIONS)
    key = shared_cache.entry_key(model_fingerprint(CheckpointReader(model)),
                                 PruneOptions(ratio=0.3, calib=str(calib_file), **FAST_OPTIONS), "cpu", "torch.float32")
    assert result.report["shared_cache_key"] == key
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        f"calibration-{key}.safetensors", f"calibration-{key}.safetensors.lock",
        f"dense-scores-{key}.json", f"dense-scores-{key}.json.lock"]
    without = prune(model, tmp_path / "out2", 0.3, calib=str(calib_file), quiet=True, **FAST_OPTIONS)
    assert without.report["shared_cache_key"] is None


# ----------------------------------------------------------------------------------------------
# The lock, between processes
# ----------------------------------------------------------------------------------------------


def _fill_once(entry: Path, computed: Path, barrier) -> None:
    """What a run does with an entry: under the lock, compute it unless it exists, then read it."""
    barrier.wait(timeout=60)  # both processes reach the check at the same moment
    with shared_cache.locked(entry):
        if not entry.exists():
            with computed.open("a") as fh:
                fh.write(f"{os.getpid()}\n")
            time.sleep(0.5)  # long enough that, unlocked, the other process would also find no entry
            entry.write_text("value")
    os._exit(0 if entry.read_text() == "value" else 1)


def test_two_processes_racing_on_one_entry_both_succeed_and_compute_it_once(tmp_path):
    context = multiprocessing.get_context("fork")  # the children only lock and write files
    entry, computed = tmp_path / "dense-scores-k.json", tmp_path / "computed.txt"
    barrier = context.Barrier(2)
    procs = [context.Process(target=_fill_once, args=(entry, computed, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(computed.read_text().splitlines()) == 1
    assert shared_cache.lock_path(entry).is_file() and shared_cache.lock_path(entry).parent == entry.parent


def _hold_then_die(entry: Path, held: Path) -> None:
    with shared_cache.locked(entry):
        held.touch()
        os.kill(os.getpid(), signal.SIGKILL)  # dies holding the lock, as a run killed mid-pass


def test_a_run_killed_while_holding_an_entry_does_not_block_the_next(tmp_path):
    entry, held = tmp_path / "calibration-k.safetensors", tmp_path / "held"
    holder = multiprocessing.get_context("fork").Process(target=_hold_then_die, args=(entry, held))
    holder.start()
    holder.join(timeout=60)
    assert holder.exitcode == -signal.SIGKILL and held.exists()
    started = time.perf_counter()
    with shared_cache.locked(entry):
        pass
    assert time.perf_counter() - started < 5


# ----------------------------------------------------------------------------------------------
# Two real runs of one model, at the same time
# ----------------------------------------------------------------------------------------------


def _run(model: Path, out: Path, ratio: float, calib: Path, cache: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "streamprune", "run", str(model), str(out), "--ratio", str(ratio),
            "--calib", str(calib), "--nsamples", "4", "--seqlen", "16", "--dtype", "float32",
            "--shared-cache", str(cache), "--quiet", "--json"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(paths: list[Path], procs: list[subprocess.Popen], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.is_file() for p in paths):
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        assert time.monotonic() < deadline, "the runs never got past calibration"
        time.sleep(0.1)


@pytest.mark.slow
def test_two_runs_racing_on_one_cache_run_the_dense_pass_once(models, calib_file, tmp_path):
    """Both runs start together; the test holds the dense-scores entry first so that both reach it while
    it is taken. Without the engine's lock both would run the dense pass (neither finds the entry)."""
    model, cache = models("llama-gqa"), tmp_path / "cache"
    key = shared_cache.entry_key(model_fingerprint(CheckpointReader(model)),
                                 PruneOptions(ratio=0.2, calib=str(calib_file), **FAST_OPTIONS), "cpu", "torch.float32")
    dense = shared_cache.entry_path(cache, "dense-scores", key)
    stagings = [tmp_path / f".r{r}.streamprune-partial" for r in (20, 50)]
    with shared_cache.locked(dense):
        procs = [_run(model, tmp_path / f"r{r}", r / 100, calib_file, cache) for r in (20, 50)]
        _wait_for([s / "calibration.safetensors" for s in stagings], procs)
        time.sleep(1.0)  # ample time for an unlocked run to start its dense pass
        assert not dense.exists() and not [p for s in stagings for p in s.glob("hidden-*.safetensors")]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    reports = [json.loads(stdout) for stdout, _ in outputs]
    assert sorted(r["dense_scores_reused"] for r in reports) == [False, True]
    assert {r["shared_cache_key"] for r in reports} == {key}
    assert list(cache.glob("dense-scores-*.json")) == [dense] and list(cache.glob("calibration-*.safetensors"))
