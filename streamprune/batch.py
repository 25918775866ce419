"""Many pruning jobs from one manifest: `streamprune batch MANIFEST`.

The manifest lists one job per row: a CSV file whose header holds at least `model_dir,out_dir,ratio`,
or a YAML (or JSON) list of mappings with the same keys. Any other column is an option of
`streamprune run`, named like the PruneOptions field or like the command-line flag (`gqa_mode` or
`gqa-mode`, `num_pruned_layers` or `layers`, `greedy: false` or `no-greedy: true`). An empty cell
keeps the default; booleans are true/false, yes/no or 1/0; relative paths are relative to the
manifest's folder. Two more columns, `gguf` and `gguf_outtype` (f32, f16 or q8_0), export the pruned
model to that GGUF file for llama.cpp right after pruning, as `run --gguf` does (a rerun whose model is
finished but whose GGUF file is missing only exports). Example (`jobs.csv`)::

    model_dir,out_dir,ratio,calib,nsamples,gqa-mode
    models/llama-7b,out/llama-7b-20,0.2,calib.txt,128,
    models/llama-7b,out/llama-7b-35,0.35,calib.txt,128,
    models/llama-7b,out/llama-7b-50,0.5,calib.txt,128,groups
    models/qwen2-7b,out/qwen2-7b-20,0.2,self,,

The same jobs as YAML (`jobs.yaml`)::

    - {model_dir: models/llama-7b, out_dir: out/llama-7b-20, ratio: 0.2, calib: calib.txt, nsamples: 128}
    - {model_dir: models/llama-7b, out_dir: out/llama-7b-50, ratio: 0.5, calib: calib.txt, gqa-mode: groups}
    - model_dir: models/qwen2-7b
      out_dir: out/qwen2-7b-20
      ratio: 0.2
      no-greedy: true

How jobs run:

* Every row is validated before anything runs; a bad row is a one-line error naming it.
* Each job is a child process (`python -m streamprune.batch _job ...`), so a crash or an OOM kill
  of one job is reported as that job's failure and the batch goes on. Its output goes to
  `<out_dir>.log` beside OUT_DIR (appended to on reruns).
* Rerunning the manifest skips jobs whose OUT_DIR holds a report with the same options, and an
  interrupted job resumes from its staging folder (the engine's own resume).
* Jobs of the same model and calibration settings share the ratio-independent work through a cache
  folder (default `<manifest folder>/.streamprune-cache`): the tokenised calibration ids and the
  dense pass's layer scores. Only the first job at, say, 20 % runs the dense pass; 35 % and 50 %
  reuse it (their reports say `dense_scores_reused: true`).
* `--executor ray` submits the same job function as Ray tasks with their CPU/GPU requirements, on
  a private local Ray instance or an existing cluster (`--ray-address auto` or `ray://HEAD:10001`).
  On a cluster every node needs streamprune installed and the manifest's paths (models, outputs,
  cache) on a shared filesystem, since each task reads and writes them where it runs.

A summary table (and with `--json FILE` the same as JSON) lists every job; the exit code is 0 when
every job succeeded or was skipped, 1 when any failed, 130 when the batch was interrupted.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from .calibration import FILE_SUFFIXES as CALIB_FILE_SUFFIXES
from .engine import REPORT_NAME
from .errors import StreamPruneError
from .export_gguf import OUTTYPES as GGUF_OUTTYPES
from .options import PruneOptions, cli_flag, plain_type
from .options import fields as option_fields

CACHE_NAME = ".streamprune-cache"
EXIT_INTERRUPTED = 130
OK, FAILED, SKIPPED, INTERRUPTED, NOT_RUN = "ok", "failed", "skipped", "interrupted", "not_run"
_TRUE, _FALSE = {"true", "yes", "1"}, {"false", "no", "0"}
_REQUIRED = ("model_dir", "out_dir", "ratio")
MAX_ERRORS = 5  # bad rows named in the one-line validation error


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


# ----------------------------------------------------------------------------------------------
# Manifest: names, types, rows
# ----------------------------------------------------------------------------------------------


OPTION_TYPES = {f.name: plain_type(f) for f in option_fields()}


# Not pruning options: the file `run --gguf` writes after pruning, and its weight type.
GGUF_KEYS = ("gguf", "gguf_outtype")


def _aliases() -> dict[str, tuple[str, bool]]:
    """Manifest key -> (field, negated): field names, dashed names and the CLI's own flags (layers, no-greedy)."""
    aliases = {"model_dir": ("model_dir", False), "model-dir": ("model_dir", False),
               "out_dir": ("out_dir", False), "out-dir": ("out_dir", False)}
    for name in GGUF_KEYS:
        aliases[name] = aliases[name.replace("_", "-")] = (name, False)
    for f in option_fields():
        for name in (f.name, f.name.replace("_", "-")):
            aliases[name] = (f.name, False)
        flag = cli_flag(f).lstrip("-")
        negated = f.default is True  # spelled --no-greedy, --no-prefetch, ...
        aliases[flag] = aliases[flag.replace("-", "_")] = (f.name, negated)
        if negated:
            aliases[f"no-{f.name.replace('_', '-')}"] = aliases[f"no_{f.name}"] = (f.name, True)
    return aliases


ALIASES = _aliases()
VALID_KEYS = ", ".join(["model_dir", "out_dir"] + [f.name for f in option_fields()] + list(GGUF_KEYS))


class _RowError(ValueError):
    """A problem with one value of one row; collected so that one message names every bad row."""


def _unknown_key_message(key: str, source: str) -> str:
    close = difflib.get_close_matches(key, list(ALIASES), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (f"unknown column {key!r} in {source}{hint}; valid columns: {VALID_KEYS} "
            "(the run command's spellings such as gqa-mode, layers or no-greedy work too)")


def _canonical_keys(keys: Iterable[str], source: str) -> dict[str, tuple[str, bool]]:
    """Map each manifest key to its field; unknown or repeated keys are errors."""
    mapping: dict[str, tuple[str, bool]] = {}
    seen: dict[str, str] = {}
    for key in keys:
        norm = str(key).strip().lower()
        if norm not in ALIASES:
            raise StreamPruneError(_unknown_key_message(str(key), source))
        name = ALIASES[norm][0]
        if name in seen:
            raise StreamPruneError(f"{source} gives {name} twice (as {seen[name]!r} and {key!r})")
        seen[name] = str(key)
        mapping[key] = ALIASES[norm]
    return mapping


def _convert(value: object, kind: type, key: str) -> object:
    """A cell (CSV text or a YAML scalar) as the option's type."""
    if kind is bool:
        text = str(value).strip().lower()
        if isinstance(value, bool) or text in _TRUE | _FALSE:
            return value if isinstance(value, bool) else text in _TRUE
        raise _RowError(f"{key} must be true/false, yes/no or 1/0, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not str(value).strip().lstrip("+-").isdigit():
            raise _RowError(f"{key} must be a whole number, got {value!r}")
        return int(str(value).strip())
    if kind is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(str(value).strip())
        except ValueError:
            raise _RowError(f"{key} must be a number, got {value!r}") from None
    return str(value).strip()


def _resolve(base: Path, value: str) -> str:
    return os.path.abspath(base / Path(value).expanduser())


def _calib_path(base: Path, calib: str) -> str:
    """Calibration files are relative to the manifest; dataset specs and 'self' are left alone."""
    looks_like_file = Path(calib).suffix.lower() in CALIB_FILE_SUFFIXES or (base / calib).exists()
    return _resolve(base, calib) if calib != "self" and looks_like_file else calib


def _parse_row(row: dict, keys: dict[str, tuple[str, bool]], number: int, base: Path) -> Job:
    values: dict[str, object] = {}
    for key, raw in row.items():
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            continue  # empty cell: the option's default
        name, negated = keys[key]
        if name in ("model_dir", "out_dir", "gguf"):
            values[name] = _resolve(base, str(raw).strip())
            continue
        if name == "gguf_outtype":
            values[name] = _gguf_outtype(raw)
            continue
        value = _convert(raw, OPTION_TYPES[name], str(key))
        values[name] = (not value) if negated else value
    missing = [k for k in _REQUIRED if k not in values]
    if missing:
        raise _RowError(f"missing {', '.join(missing)}")
    if "calib" in values:
        values["calib"] = _calib_path(base, str(values["calib"]))
    model_dir, out_dir = str(values.pop("model_dir")), str(values.pop("out_dir"))
    gguf = {k: values.pop(k) for k in GGUF_KEYS if k in values}
    _check_options(values)
    return Job(number, model_dir, out_dir, values, **gguf)


def _gguf_outtype(raw: object) -> str:
    value = str(raw).strip().lower()
    if value not in GGUF_OUTTYPES:
        raise _RowError(f"gguf_outtype must be one of {', '.join(GGUF_OUTTYPES)}, got {raw!r}")
    return value


def _check_options(values: dict) -> None:
    try:
        PruneOptions(**values).validate()
    except StreamPruneError as exc:
        raise _RowError(str(exc).replace("--", "")) from None


def _csv_rows(path: Path) -> tuple[list[str], list[tuple[str, dict]]]:
    with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: spreadsheets often add a BOM
        reader = csv.DictReader(fh, skipinitialspace=True)
        header = [h for h in (reader.fieldnames or []) if h is not None]
        rows = []
        for row in reader:
            if None in row:
                raise StreamPruneError(f"{path.name} line {reader.line_num} has more cells than the header")
            cells = [str(v or "").strip() for v in row.values()]
            if any(cells) and not cells[0].startswith("#"):  # blank lines and '#' comment rows
                rows.append((f"line {reader.line_num}", row))
    return header, rows


def _mapping_rows(path: Path) -> list[tuple[str, dict]]:
    data = _load_structured(path)
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise StreamPruneError(f"{path.name} must be a list of mappings, one per job (see `streamprune batch -h`)")
    return [("", r) for r in data]


def _load_structured(path: Path) -> object:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise StreamPruneError(f"{path.name} is not valid JSON ({exc})") from None
    try:
        import yaml
    except ImportError:
        raise StreamPruneError("a YAML manifest needs PyYAML: pip install pyyaml (or use a CSV manifest)") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise StreamPruneError(f"{path.name} is not valid YAML ({' '.join(str(exc).split())})") from None


def load_manifest(path: str | Path) -> list[Job]:
    """Parse and validate every row; raises one StreamPruneError naming all bad rows."""
    path = Path(path)
    if not path.is_file():
        raise StreamPruneError(f"manifest {path} not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        header, rows = _csv_rows(path)
        keys = _canonical_keys(header, path.name)
        _check_header(keys, path.name)
    elif suffix in (".yaml", ".yml", ".json"):
        rows = _mapping_rows(path)
        keys = _canonical_keys({k for _, r in rows for k in r}, path.name)
    else:
        raise StreamPruneError(f"manifest {path.name}: use a .csv, .yaml/.yml or .json file")
    if not rows:
        raise StreamPruneError(f"manifest {path.name} lists no jobs")
    jobs = _parse_rows(rows, keys, path)
    _check_distinct_outputs(jobs, path.name)
    return jobs


def _check_header(keys: dict[str, tuple[str, bool]], source: str) -> None:
    missing = [k for k in _REQUIRED if k not in {name for name, _ in keys.values()}]
    if missing:
        raise StreamPruneError(f"{source} has no {', '.join(missing)} column; the header needs at least "
                               "model_dir,out_dir,ratio")


def _parse_rows(rows: list[tuple[str, dict]], keys: dict, path: Path) -> list[Job]:
    jobs, errors = [], []
    base = path.resolve().parent
    for number, (where, row) in enumerate(rows, start=1):
        try:
            jobs.append(_parse_row(row, keys, number, base))
        except _RowError as exc:
            errors.append(f"job {number}{f' ({where})' if where else ''}: {exc}")
    if errors:
        more = f"; and {len(errors) - MAX_ERRORS} more" if len(errors) > MAX_ERRORS else ""
        raise StreamPruneError(f"invalid manifest {path.name}: {'; '.join(errors[:MAX_ERRORS])}{more}")
    return jobs


def _check_distinct_outputs(jobs: list[Job], source: str) -> None:
    """Two jobs writing one folder would overwrite (or, on Ray, corrupt) each other's output."""
    first: dict[str, int] = {}
    for job in jobs:
        for path in filter(None, (job.out_dir, job.gguf)):
            if path in first:
                raise StreamPruneError(f"invalid manifest {source}: jobs {first[path]} and {job.number} "
                                       f"both write {path}; give every job its own out_dir and gguf")
            first[path] = job.number


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
# One job (the function both executors run)
# ----------------------------------------------------------------------------------------------


def _comparable(options: dict) -> dict:
    return PruneOptions(**{k: v for k, v in options.items() if k in OPTION_TYPES}).result_options()


def _differences(report: dict, job: Job) -> list[str]:
    """How a finished run's model and options differ from the job's ('nsamples 4 -> 5'); empty if the same."""
    diffs = []
    if Path(report["model_dir"]).resolve() != Path(job.model_dir).resolve():
        diffs.append(f"model_dir {report['model_dir']} -> {job.model_dir}")
    done, want = _comparable(report["options"]), _comparable(job.options)
    diffs += [f"{k} {done[k]} -> {want[k]}" for k in want if done.get(k) != want[k]]
    return diffs


def _read_finished(job: Job) -> tuple[dict | None, list[str]]:
    """(report in OUT_DIR, its differences from the job); (None, []) when OUT_DIR holds no readable report."""
    try:
        report = json.loads((Path(job.out_dir) / REPORT_NAME).read_text())
        return report, _differences(report, job)
    except (OSError, ValueError, KeyError, TypeError):
        return None, []


def finished_report(job: Job) -> dict | None:
    """The report in OUT_DIR if it is this job's finished result (same input and options), else None."""
    report, diffs = _read_finished(job)
    return report if report is not None and not diffs else None


def _result(job: Job, status: str, **extra) -> dict:
    base = {"job": job.number, "model_dir": job.model_dir, "out_dir": job.out_dir, "ratio": job.options["ratio"],
            "options": job.options, "status": status, "params_before": None, "params_after": None,
            "achieved_ratio": None, "seconds": None, "peak_rss_mb": None, "log": job.log_path, "error": None,
            "dense_scores_reused": None, "dense_pass_seconds": None, "shared_group": shared_group(job),
            "gguf": job.gguf}
    return {**base, **extra}


def _from_report(report: dict) -> dict:
    dense = [layer.get("seconds", {}).get("pass1_dense_forward") for layer in report.get("layers", [])]
    return {"params_before": report.get("params_before"), "params_after": report.get("params_after"),
            "achieved_ratio": report.get("achieved_ratio"),
            "dense_scores_reused": bool(report.get("dense_scores_reused")),
            "dense_pass_seconds": sum(d for d in dense if d) or None}


def shared_group(job: Job) -> str:
    """Jobs in one group can share calibration ids and dense scores (what the engine's cache key covers)."""
    o = asdict(PruneOptions(**job.options))
    key = [job.model_dir, o["calib"], o["nsamples"], o["seqlen"], o["seed"], o["device"], o["dtype"]]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]


def run_job(job: Job) -> dict:
    """Run one job in a child process and describe the outcome as a JSON-able dict.

    The local executor calls this directly and the Ray executor as a remote task, so both share one
    code path. All file access happens here, on the machine that runs the job.
    """
    done, diffs = _read_finished(job)
    if done is not None and not diffs and (job.gguf is None or Path(job.gguf).is_file()):
        return _result(job, SKIPPED, **_from_report(done))
    if done is not None and diffs and not job.overwrite:  # said here, and more precisely than the engine would
        return _result(job, FAILED, error=f"{job.out_dir} holds a finished run with other settings "
                                          f"({', '.join(diffs)}); pass --overwrite to replace it")
    started = time.perf_counter()
    returncode, peak_mb, offset = _run_child(job)
    timing = {"seconds": time.perf_counter() - started, "peak_rss_mb": peak_mb}
    if returncode == 0:
        report = finished_report(job)
        if report is not None:
            return _result(job, OK, **timing, **_from_report(report))
        return _result(job, FAILED, **timing, error=f"exited cleanly but {REPORT_NAME} is missing or differs")
    status = INTERRUPTED if returncode == EXIT_INTERRUPTED else FAILED
    return _result(job, status, **timing, error=_failure_reason(job.log_path, offset, returncode))


def _child_command(job: Job) -> list[str]:
    # Once `streamprune run` takes --shared-cache this can become `-m streamprune run ... --json --quiet`.
    return [sys.executable, "-m", "streamprune.batch", "_job", json.dumps(asdict(job))]


def _run_child(job: Job) -> tuple[int, float, int]:
    """Run the job with its output appended to its log; return (exit code, peak RSS MB, log offset)."""
    log = Path(job.log_path)
    log.parent.mkdir(parents=True, exist_ok=True)
    command = _child_command(job)
    with log.open("a", encoding="utf-8") as fh:
        fh.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} job {job.number}: {shlex.join(command)}\n")
        fh.flush()
        offset = fh.tell()
        # Its own session: a terminal Ctrl-C reaches only the batch, which forwards exactly one SIGINT
        # (a second one would make the engine abort instead of stopping at a layer boundary).
        proc = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=_child_env(), start_new_session=True)
        code, peak = _wait(proc)
    return code, peak, offset


def _child_env() -> dict[str, str]:
    """The job must import the streamprune that runs this batch (a source checkout, an editable install),
    whatever the working directory; so its folder goes first on the child's PYTHONPATH."""
    root = str(Path(__file__).resolve().parent.parent)
    paths = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


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


# ----------------------------------------------------------------------------------------------
# The child process: `python -m streamprune.batch _job JSON`
# ----------------------------------------------------------------------------------------------


def _stop_when_orphaned() -> None:
    """If the batch dies (kill -9, OOM, closed terminal), stop at a layer boundary rather than run on unwatched."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, daemon=True, name="streamprune-orphan-watch").start()


def _job_main(payload: str) -> int:
    from .engine import prune

    job = Job(**json.loads(payload))
    _stop_when_orphaned()
    try:
        report = finished_report(job) if job.gguf else None  # pruned earlier; only the export is missing
        if report is None:
            if job.gguf:
                from .export_gguf import check_destination

                check_destination(job.gguf, job.overwrite)  # before the pruning, not after it
            report = prune(job.model_dir, job.out_dir, quiet=True, overwrite=job.overwrite, restart=job.restart,
                           shared_cache=job.shared_cache, **job.options).report
        if job.gguf:
            from .export_gguf import export_gguf

            exported = export_gguf(job.out_dir, job.gguf, job.gguf_outtype, overwrite=job.overwrite)
            print(f"exported {exported.tensors} tensors ({exported.outtype}) -> {exported.path}", file=sys.stderr)
    except StreamPruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED if "interrupted" in str(exc) else 2
    except KeyboardInterrupt:
        print("error: interrupted; run the batch again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(json.dumps(report, indent=2))
    return 0


# ----------------------------------------------------------------------------------------------
# Executors
# ----------------------------------------------------------------------------------------------

Progress = Callable[[dict, int], None]


def _interrupted_rest(jobs: list[Job], results: dict[int, dict], current: Iterable[int]) -> None:
    for job in jobs:
        if job.number not in results:
            results[job.number] = _result(job, INTERRUPTED if job.number in current else NOT_RUN)


def run_local(jobs: list[Job], progress: Progress) -> tuple[list[dict], bool]:
    """One job after another in this machine; returns (results in manifest order, interrupted)."""
    results: dict[int, dict] = {}
    current, interrupted = 0, False
    try:
        for job in jobs:
            current = job.number
            results[job.number] = run_job(job)
            progress(results[job.number], len(jobs))
            if results[job.number]["status"] == INTERRUPTED:  # the job was stopped from outside: so is the batch
                interrupted = True
                break
    except KeyboardInterrupt:
        interrupted = True
    if interrupted:
        _interrupted_rest(jobs, results, [current])
    return [results[j.number] for j in jobs], interrupted


def _import_ray():
    try:
        import ray
    except ImportError:
        raise StreamPruneError("--executor ray needs Ray: pip install 'streamprune[ray]'") from None
    return ray


def _ray_init(ray, address: str | None) -> bool:
    """Attach to `address` (or start a private local instance); True if this call started Ray."""
    if ray.is_initialized():  # e.g. a caller (or a test) that already chose its cluster
        return False
    if address:
        _check_reachable(address)
    try:
        ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or "a local instance"
        raise StreamPruneError(f"cannot start or reach Ray at {where} ({' '.join(str(exc).split())})") from None
    return True


def _check_reachable(address: str) -> None:
    """Ray retries an unreachable HOST:PORT for many minutes; a plain TCP connect tells in seconds."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():  # 'auto', 'local': Ray finds the address itself
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise StreamPruneError(f"cannot reach Ray at {address} ({exc.strerror or exc}); is the cluster up "
                               "(`ray status` on its head node) and the port open?") from None


class _GroupQueue:
    """Orders jobs so that within a shared group one job runs first and fills the cache for the rest.

    Until a job of the group has succeeded, its jobs run one at a time (concurrent first writers of the
    cache would race); after that the rest of the group runs in parallel, reading the cache only.
    """

    def __init__(self, jobs: list[Job]):
        self.waiting: dict[str, list[Job]] = {}
        for job in sorted(jobs, key=lambda j: bool(j.options.get("uniform"))):  # jobs that run the dense pass first
            self.waiting.setdefault(shared_group(job), []).append(job)

    def first(self) -> list[Job]:
        return [group.pop(0) for group in self.waiting.values()]

    def after(self, job: Job, status: str) -> list[Job]:
        rest = self.waiting.get(shared_group(job), [])
        released = rest[:] if status == OK else rest[:1]
        del rest[:len(released)]
        return released


def run_ray(jobs: list[Job], settings: BatchSettings, progress: Progress) -> tuple[list[dict], bool]:
    """Each job a Ray task reserving --cpus-per-job / --gpus-per-job; returns (results, interrupted)."""
    ray = _import_ray()
    started = _ray_init(ray, settings.ray_address)
    task = ray.remote(run_job).options(num_cpus=settings.cpus_per_job, num_gpus=settings.gpus_per_job,
                                       max_retries=0, name="streamprune-job")
    queue, results = _GroupQueue(jobs), {}
    pending = {task.remote(job): job for job in queue.first()}
    try:
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ref)
            results[job.number] = _ray_result(ray, ref, job)
            progress(results[job.number], len(jobs))
            pending.update({task.remote(j): j for j in queue.after(job, results[job.number]["status"])})
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref)  # not force: the task forwards a SIGINT, so its job stops resumable
        _interrupted_rest(jobs, results, [j.number for j in pending.values()])
        return [results[j.number] for j in jobs], True
    finally:
        if started:
            ray.shutdown()
    return [results[j.number] for j in jobs], False


def _ray_result(ray, ref, job: Job) -> dict:
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:  # the worker itself died or the task was cancelled
        return _result(job, FAILED, error=f"Ray: {' '.join(str(exc).split())[:300]}")


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------


def shared_work(results: list[dict]) -> dict:
    """Which jobs reused another job's dense pass, and an estimate of the time that saved.

    The estimate is the dense forward time measured in this batch for the same group, once per
    reusing job; jobs whose cache came from an earlier batch are listed but not counted.
    """
    measured: dict[str, list[float]] = {}
    for r in results:
        if r["status"] == OK and not r["dense_scores_reused"] and r["dense_pass_seconds"]:
            measured.setdefault(r["shared_group"], []).append(r["dense_pass_seconds"])
    reused = [r for r in results if r["status"] == OK and r["dense_scores_reused"]]
    saved = sum(sum(measured[r["shared_group"]]) / len(measured[r["shared_group"]])
                for r in reused if r["shared_group"] in measured)
    return {"jobs_reusing_dense_pass": [r["job"] for r in reused], "estimated_seconds_saved": round(saved, 3)}


def summarize(results: list[dict], manifest: str, settings: BatchSettings, cache: str | None, seconds: float,
              interrupted: bool) -> dict:
    counts = {s: sum(r["status"] == s for r in results) for s in (OK, SKIPPED, FAILED, INTERRUPTED, NOT_RUN)}
    if interrupted:
        code = EXIT_INTERRUPTED
    else:
        code = 0 if counts[OK] + counts[SKIPPED] == len(results) else 1
    return {"manifest": os.path.abspath(manifest), "executor": settings.executor,
            "shared_cache": cache, "counts": counts,
            "shared_work": shared_work(results), "seconds": round(seconds, 3), "exit_code": code, "jobs": results}


def _short(path: str | None) -> str:
    if not path:
        return "-"
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return path


def _cells(r: dict) -> list[str]:
    params = "-" if r["params_before"] is None else f"{r['params_before']:,} -> {r['params_after']:,}"
    removed = "-" if r["achieved_ratio"] is None else f"{r['achieved_ratio']:.2%}"
    seconds = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
    rss = "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
    status = "skipped (done)" if r["status"] == SKIPPED else r["status"].replace("_", " ")
    return [str(r["job"]), Path(r["model_dir"]).name, _short(r["out_dir"]), f"{r['ratio']:g}", status, params,
            removed, seconds, rss, _short(r["log"])]


def format_summary(summary: dict) -> str:
    """The summary table, then one line per failure and the shared-work saving."""
    header = ["#", "model", "out", "ratio", "status", "params before -> after", "removed", "seconds",
              "peak RSS MB", "log"]
    rows = [header] + [_cells(r) for r in summary["jobs"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    for r in summary["jobs"]:
        if r["status"] in (FAILED, INTERRUPTED) and r["error"]:
            lines.append(f"job {r['job']} {r['status']}: {r['error']} (log: {_short(r['log'])})")
    lines += _shared_work_lines(summary["shared_work"])
    c = summary["counts"]
    tally = ", ".join(f"{n} {name.replace('_', ' ')}" for name, n in c.items() if n)
    lines.append(f"{len(summary['jobs'])} job(s): {tally} in {summary['seconds']:.1f} s")
    return "\n".join(lines)


def _shared_work_lines(shared: dict) -> list[str]:
    jobs = shared["jobs_reusing_dense_pass"]
    if not jobs:
        return []
    saving = shared["estimated_seconds_saved"]
    estimate = f"; dense pass saved about {saving:.1f} s against separate runs" if saving >= 0.05 else ""
    return [f"shared work: job(s) {', '.join(map(str, jobs))} reused the calibration ids and dense-pass "
            f"scores of an earlier run of the same model{estimate}"]


# ----------------------------------------------------------------------------------------------
# Entry point for the CLI and Python callers
# ----------------------------------------------------------------------------------------------


def _echo_progress(result: dict, total: int) -> None:
    extra = f" ({result['error']})" if result["error"] else ""
    seconds = "" if result["seconds"] is None else f" in {result['seconds']:.1f} s"
    print(f"[{result['job']}/{total}] {result['status']}: {_short(result['out_dir'])}{seconds}{extra}",
          file=sys.stderr, flush=True)


def run_batch(manifest: str | Path, settings: BatchSettings | None = None,
              progress: Progress | None = None) -> dict:
    """Validate the manifest, run every job, and return the summary (see `format_summary`)."""
    settings = settings or BatchSettings()
    if settings.executor not in ("local", "ray"):
        raise StreamPruneError(f"unknown executor {settings.executor!r}; use local or ray")
    jobs = prepare_jobs(load_manifest(manifest), manifest, settings)
    if settings.executor == "ray":
        _import_ray()  # fail before any work if Ray is missing
    started = time.perf_counter()
    progress = progress or (lambda *_: None)
    if settings.executor == "ray":
        results, interrupted = run_ray(jobs, settings, progress)
    else:
        results, interrupted = run_local(jobs, progress)
    return summarize(results, str(manifest), settings, jobs[0].shared_cache, time.perf_counter() - started,
                     interrupted)


def batch_main(manifest: str, settings: BatchSettings) -> int:
    """`streamprune batch`: run, print the table, write --json; returns the exit code."""
    summary = run_batch(manifest, settings, _echo_progress)
    print(format_summary(summary))
    if settings.json_path:
        Path(settings.json_path).write_text(json.dumps(summary, indent=2) + "\n")
    return summary["exit_code"]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_job":
        sys.exit(_job_main(sys.argv[2]))
    sys.exit("usage: python -m streamprune.batch _job JOB_JSON (internal; use `streamprune batch MANIFEST`)")


__all__ = ["BatchSettings", "Job", "format_summary", "load_manifest", "run_batch", "run_job"]
