"""Many pruning jobs from one manifest: `streamprune batch MANIFEST`.

The manifest lists one job per row: a CSV file whose header holds at least `model_dir,out_dir,ratio`,
or a YAML (or JSON) list of mappings with the same keys. Any other column is an option of
`streamprune run`, named like the PruneOptions field or like the command-line flag (`gqa_mode` or
`gqa-mode`, `num_pruned_layers` or `layers`, `greedy: false` or `no-greedy: true`). An empty cell
keeps the default; booleans are true/false, yes/no or 1/0; relative paths are relative to the
manifest's folder. Example (`jobs.csv`)::

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
* Each job is the command a user would type, `streamprune run MODEL_DIR OUT_DIR <options> --quiet
  --json`, in a child process, so a crash or an OOM kill of one job is reported as that job's failure
  and the batch goes on; the JSON report it prints is the job's result. Its output goes to
  `<out_dir>.log` beside OUT_DIR (appended to on reruns).
* Rerunning the manifest skips jobs whose OUT_DIR already holds their run: the same fingerprint (input
  checkpoint and result-changing options) that makes `streamprune run` say "already complete". A finished
  run with other options or input fails the job unless --overwrite, as `run` refuses it. An interrupted
  job resumes from its staging folder (the engine's own resume).
* Jobs of the same model and calibration settings share the ratio-independent work through a cache
  folder (default `<manifest folder>/.streamprune-cache`): the tokenised calibration ids and the
  dense pass's layer scores. Only the first job at, say, 20 % runs the dense pass; 35 % and 50 %
  reuse it (their reports say `dense_scores_reused: true`). Jobs running at the same time take turns
  through a lock on the cache entry (streamprune/shared_cache.py), so the dense pass runs once.
* `--executor ray` submits the same job function as Ray tasks with their CPU/GPU requirements, on
  a private local Ray instance or an existing cluster (`--ray-address auto` or `ray://HEAD:10001`).
  On a cluster every node needs streamprune installed and the manifest's paths (models, outputs,
  cache) on a shared filesystem (one where flock works, such as NFS on Linux), since each task reads
  and writes them where it runs.

A summary table (and with `--json FILE` the same as JSON) lists every job; the exit code is 0 when
every job succeeded or was skipped, 1 when any failed, 130 when the batch was interrupted.

Modules: `manifest` (rows -> jobs, checked against the options schema), `jobs` (one job: its command,
skip/resume checks, its result), `executors` (local processes, Ray), `summary` (table and JSON).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import StreamPruneError
from .executors import Progress, import_ray, run_local, run_ray
from .jobs import BatchSettings, Job, prepare_jobs, run_job
from .manifest import load_manifest
from .summary import echo_progress, format_summary, summarize


def run_batch(manifest: str | Path, settings: BatchSettings | None = None,
              progress: Progress | None = None) -> dict:
    """Validate the manifest, run every job, and return the summary (see `format_summary`)."""
    settings = settings or BatchSettings()
    if settings.executor not in ("local", "ray"):
        raise StreamPruneError(f"unknown executor {settings.executor!r}; use local or ray")
    jobs = prepare_jobs(load_manifest(manifest), manifest, settings)
    if settings.executor == "ray":
        import_ray()  # fail before any work if Ray is missing
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
    summary = run_batch(manifest, settings, echo_progress)
    print(format_summary(summary))
    if settings.json_path:
        Path(settings.json_path).write_text(json.dumps(summary, indent=2) + "\n")
    return summary["exit_code"]


__all__ = ["BatchSettings", "Job", "batch_main", "format_summary", "load_manifest", "run_batch", "run_job"]
