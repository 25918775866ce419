"""One job of a batch: what it is, the command it runs, and the result it reports.

A job runs `streamprune run MODEL_DIR OUT_DIR <its options> --quiet --json` in a child process (the
command a user would type), so a crash or an OOM kill of one job is that job's failure, and the job's
result is the JSON report that command prints. Both executors call `run_job`; everything it touches
(OUT_DIR, the log, the shared cache) is read and written on the machine that runs it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import CheckpointReader
from ..errors import StreamPruneError
from ..options import PruneOptions, cli_flag, plain_type
from ..options import fields as option_fields
from ..output import finished_run_differences, read_report
from ..run_state import run_fingerprint

CACHE_NAME = ".streamprune-cache"
EXIT_INTERRUPTED = 130
OK, FAILED, SKIPPED, INTERRUPTED, NOT_RUN = "ok", "failed", "skipped", "interrupted", "not_run"
STOP_WITH_PARENT = "STREAMPRUNE_STOP_WITH_PARENT"  # read by `streamprune run` (cli.stop_with_parent)
_FIELDS = {f.name: f for f in option_fields()}


@dataclass
class Job:
    """One row of the manifest, with absolute paths; `options` are PruneOptions keyword arguments."""

    number: int
    model_dir: str
    out_dir: str
    options: dict
    shared_cache: str | None = None
    overwrite: bool = False
    restart: bool = False
    gguf: str | None = None  # also export the pruned model to this GGUF file (`run --gguf`)
    gguf_outtype: str = "f16"
    decilm: str | None = None  # also export to this DeciLM folder for vLLM (`run --decilm`)
    decilm_ffn_multiple: int | None = None

    @property
    def log_path(self) -> str:
        out = Path(self.out_dir)
        return str(out.parent / f"{out.name}.log")


@dataclass
class BatchSettings:
    """How the jobs run; mirrors `streamprune batch`'s options."""

    executor: str = "local"
    ray_address: str | None = None
    gpus_per_job: float = 0
    cpus_per_job: float = 1
    shared_cache: str | None = None  # None: <manifest folder>/.streamprune-cache
    no_shared_cache: bool = False
    overwrite: bool = False
    restart: bool = False
    json_path: str | None = None


def prepare_jobs(jobs: list[Job], manifest: str | Path, settings: BatchSettings) -> list[Job]:
    """Apply the batch-wide settings: the shared cache, --overwrite/--restart, and cuda for GPU jobs."""
    cache = None if settings.no_shared_cache else settings.shared_cache or str(
        Path(manifest).resolve().parent / CACHE_NAME)
    prepared = []
    for job in jobs:
        options = dict(job.options)
        if settings.gpus_per_job > 0:
            options.setdefault("device", "cuda")  # a row's own device wins
        prepared.append(dataclasses.replace(job, options=options, shared_cache=cache and os.path.abspath(cache),
                                            overwrite=settings.overwrite, restart=settings.restart))
    return prepared


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def option_args(name: str, value: object) -> list[str]:
    """One option as `streamprune run` spells it, from the schema: ['--nsamples', '16'], ['--no-greedy'], []."""
    f = _FIELDS[name]
    if value is None:  # alpha, layers: None is their default
        return []
    if plain_type(f) is bool:  # the flag (--uniform, --no-greedy) sets the non-default value
        return [] if value == f.default else [cli_flag(f)]
    return [cli_flag(f), str(value)]  # str() of a float round-trips exactly


def run_command(job: Job) -> list[str]:
    """The job as a command line: `python -m streamprune run MODEL_DIR OUT_DIR ... --quiet --json`."""
    argv = [sys.executable, "-m", "streamprune", "run", job.model_dir, job.out_dir]
    for name, value in job.options.items():
        argv += option_args(name, value)
    if job.shared_cache:
        argv += ["--shared-cache", job.shared_cache]
    if job.gguf:
        argv += ["--gguf", job.gguf, "--gguf-outtype", job.gguf_outtype]
    if job.decilm:
        argv += ["--decilm", job.decilm] + _ffn_multiple_args(job, "--decilm-ffn-multiple")
    argv += ["--overwrite"] * job.overwrite + ["--restart"] * job.restart
    return argv + ["--quiet", "--json"]


def _ffn_multiple_args(job: Job, flag: str) -> list[str]:
    return [] if job.decilm_ffn_multiple is None else [flag, str(job.decilm_ffn_multiple)]


def missing_exports(job: Job) -> list[list[str]]:
    """For a job whose model is pruned: the `streamprune export` commands of the exports not written yet
    (a DeciLM folder counts as written once its config.json is there: it appears by a rename)."""
    base = [sys.executable, "-m", "streamprune", "export", job.out_dir]
    tail = ["--overwrite"] * job.overwrite + ["--quiet"]
    commands = []
    if job.gguf and not Path(job.gguf).is_file():
        commands.append(base + [job.gguf, "--outtype", job.gguf_outtype] + tail)
    if job.decilm and not (Path(job.decilm) / "config.json").is_file():
        commands.append(base + [job.decilm, "--format", "decilm"] + _ffn_multiple_args(job, "--ffn-multiple") + tail)
    return commands


# ----------------------------------------------------------------------------------------------
# Finished runs and results
# ----------------------------------------------------------------------------------------------


def _job_fingerprint(job: Job) -> dict | None:
    """The engine's identity of the job's run (input checkpoint and result-changing options, see
    run_state.run_fingerprint); None when the model folder cannot be read, so the job runs and the engine
    says what is wrong with it."""
    try:
        reader = CheckpointReader(job.model_dir)
    except (OSError, StreamPruneError):
        return None
    return run_fingerprint(reader, PruneOptions(**job.options))


def _read_finished(job: Job) -> tuple[dict | None, list[str]]:
    """(report of the finished run in OUT_DIR, how that run differs from the job's: ['input checkpoint',
    'nsamples 4 -> 5'], empty when it is the same run). The engine's own test (output.finished_run_differences),
    so a job is skipped exactly when `streamprune run` would say "already complete". (None, []) when OUT_DIR
    holds no finished run or the model cannot be read: the job runs."""
    fingerprint = _job_fingerprint(job)
    diffs = None if fingerprint is None else finished_run_differences(Path(job.out_dir), fingerprint)
    if diffs is None:
        return None, []
    try:
        return read_report(job.out_dir), diffs
    except (OSError, ValueError, StreamPruneError):
        return None, []


def result(job: Job, status: str, **extra) -> dict:
    """The job's line of the summary; `shared_group` is the engine's shared-cache key (None when unknown)."""
    base = {"job": job.number, "model_dir": job.model_dir, "out_dir": job.out_dir, "ratio": job.options["ratio"],
            "options": job.options, "status": status, "params_before": None, "params_after": None,
            "achieved_ratio": None, "seconds": None, "peak_rss_mb": None, "log": job.log_path, "error": None,
            "dense_scores_reused": None, "dense_pass_seconds": None, "shared_group": None, "gguf": job.gguf,
            "decilm": job.decilm}
    return {**base, **extra}


def _from_report(report: dict) -> dict:
    dense = [layer.get("seconds", {}).get("pass1_dense_forward") for layer in report.get("layers", [])]
    return {"params_before": report.get("params_before"), "params_after": report.get("params_after"),
            "achieved_ratio": report.get("achieved_ratio"),
            "dense_scores_reused": bool(report.get("dense_scores_reused")),
            "dense_pass_seconds": sum(d for d in dense if d) or None,
            "shared_group": report.get("shared_cache_key")}


def run_job(job: Job) -> dict:
    """Run one job (unless OUT_DIR already holds its result) and describe the outcome as a JSON-able dict."""
    done, diffs = _read_finished(job)
    if done is not None and not diffs and not missing_exports(job):
        return result(job, SKIPPED, **_from_report(done))
    if done is not None and not diffs:  # pruned earlier; only an export (GGUF, DeciLM) is missing
        return _export_only(job, done)
    if done is not None and not job.overwrite:  # the engine's refusal, without starting a process for it
        return result(job, FAILED, error=f"{job.out_dir} holds a finished run with other options or input "
                                         f"({', '.join(diffs)}); pass --overwrite to replace it")
    started = time.perf_counter()
    returncode, peak_mb, offset, stdout = _run_child(job)
    timing = {"seconds": time.perf_counter() - started, "peak_rss_mb": peak_mb}
    if returncode == 0:
        try:
            return result(job, OK, **timing, **_from_report(json.loads(stdout)))
        except (ValueError, AttributeError):
            return result(job, FAILED, **timing, error="exited cleanly but printed no JSON report")
    status = INTERRUPTED if returncode == EXIT_INTERRUPTED else FAILED
    return result(job, status, **timing, error=_failure_reason(job.log_path, offset, returncode))


def _export_only(job: Job, done: dict) -> dict:
    started, peak = time.perf_counter(), 0.0
    for command in missing_exports(job):
        returncode, peak_mb, offset, _ = _run_child(job, command)
        peak = max(peak, peak_mb)
        if returncode != 0:
            timing = {"seconds": time.perf_counter() - started, "peak_rss_mb": peak}
            return result(job, FAILED, **timing, error=_failure_reason(job.log_path, offset, returncode))
    return result(job, OK, seconds=time.perf_counter() - started, peak_rss_mb=peak, **_from_report(done))


# ----------------------------------------------------------------------------------------------
# The child process
# ----------------------------------------------------------------------------------------------


def _run_child(job: Job, command: list[str] | None = None) -> tuple[int, float, int, str]:
    """Run the job's command; return (exit code, peak RSS MB, log offset, its stdout).

    Its stderr goes to the log as it comes; its stdout (the JSON report) is collected in a temporary
    file (no pipe to drain while waiting) and appended to the log at the end.
    """
    log = Path(job.log_path)
    log.parent.mkdir(parents=True, exist_ok=True)
    command = command or run_command(job)
    with log.open("a", encoding="utf-8") as fh, tempfile.TemporaryFile() as out:
        fh.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} job {job.number}: {shlex.join(command)}\n")
        fh.flush()
        offset = fh.tell()
        # Its own session: a terminal Ctrl-C reaches only the batch, which forwards exactly one SIGINT
        # (a second one would make the engine abort instead of stopping at a layer boundary).
        proc = subprocess.Popen(command, stdout=out, stderr=fh, stdin=subprocess.DEVNULL, env=_child_env(),
                                start_new_session=True)
        code, peak = _wait(proc)
        out.seek(0)
        stdout = out.read().decode("utf-8", errors="replace")
        fh.write(stdout)
    return code, peak, offset, stdout


def _child_env() -> dict[str, str]:
    """The job must import the streamprune that runs this batch (a source checkout, an editable install),
    whatever the working directory; so its folder goes first on the child's PYTHONPATH. It also stops
    resumably if this process dies (kill -9, OOM) rather than run on unwatched."""
    root = str(Path(__file__).resolve().parents[2])
    paths = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), STOP_WITH_PARENT: str(os.getpid())}


def _wait(proc: subprocess.Popen) -> tuple[int, float]:
    """Wait with wait4, which gives this child's own peak RSS (RUSAGE_CHILDREN is a max over all).

    Ctrl-C is passed on to the job, which stops resumably and exits 130 (the caller then stops the batch).
    """
    while True:
        try:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.2)  # short sleeps: Ray's task cancellation only lands between Python bytecodes
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)  # first: stop at the next layer boundary; second: abort now
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    return proc.returncode, _rss_mb(usage.ru_maxrss)


def _rss_mb(maxrss: int) -> float:
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, KiB on Linux


def _failure_reason(log_path: str, offset: int, returncode: int) -> str:
    """The job's own one-line error from its log, or how it died."""
    if returncode < 0:
        name = signal.Signals(-returncode).name
        oom = " (out of memory?)" if name == "SIGKILL" else ""
        return f"killed by {name}{oom}"
    try:
        with open(log_path, encoding="utf-8", errors="replace") as fh:
            fh.seek(offset)
            lines = [line.strip() for line in fh if line.strip()]
    except OSError:
        lines = []
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    last = errors[-1] if errors else (lines[-1] if lines else "no output")
    return f"exit {returncode}: {last}"
