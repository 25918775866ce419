"""The batch summary: a table of every job, failures, and the work the jobs shared."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .jobs import EXIT_INTERRUPTED, FAILED, INTERRUPTED, NOT_RUN, OK, SKIPPED, BatchSettings


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


def echo_progress(result: dict, total: int) -> None:
    extra = f" ({result['error']})" if result["error"] else ""
    seconds = "" if result["seconds"] is None else f" in {result['seconds']:.1f} s"
    print(f"[{result['job']}/{total}] {result['status']}: {_short(result['out_dir'])}{seconds}{extra}",
          file=sys.stderr, flush=True)
