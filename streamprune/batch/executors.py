"""Where jobs run: one after another in this machine's processes, or as Ray tasks.

Both executors run `jobs.run_job` and return (results in manifest order, interrupted). They need no
order among the jobs: jobs of one model that share a cache entry coordinate through the entry's lock
(streamprune/shared_cache.py), so the first one to reach the dense pass runs it and the others wait
for it and reuse its scores.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable

from ..errors import StreamPruneError
from .jobs import FAILED, INTERRUPTED, NOT_RUN, BatchSettings, Job, result, run_job

Progress = Callable[[dict, int], None]


def _interrupted_rest(jobs: list[Job], results: dict[int, dict], current: Iterable[int]) -> None:
    current = set(current)
    for job in jobs:
        if job.number not in results:
            results[job.number] = result(job, INTERRUPTED if job.number in current else NOT_RUN)


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


# ----------------------------------------------------------------------------------------------
# Ray
# ----------------------------------------------------------------------------------------------


def import_ray():
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


def run_ray(jobs: list[Job], settings: BatchSettings, progress: Progress) -> tuple[list[dict], bool]:
    """Each job a Ray task reserving --cpus-per-job / --gpus-per-job; returns (results, interrupted).

    All jobs are submitted at once; Ray starts them as its resources allow. A job waiting for another
    job's dense pass (same cache entry) keeps its reservation while it waits.
    """
    ray = import_ray()
    started = _ray_init(ray, settings.ray_address)
    task = ray.remote(run_job).options(num_cpus=settings.cpus_per_job, num_gpus=settings.gpus_per_job,
                                       max_retries=0, name="streamprune-job")
    results: dict[int, dict] = {}
    pending = {task.remote(job): job for job in jobs}
    try:
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ref)
            results[job.number] = _ray_result(ray, ref, job)
            progress(results[job.number], len(jobs))
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref)  # not force: the task forwards a SIGINT, so its job stops resumably
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
        return result(job, FAILED, error=f"Ray: {' '.join(str(exc).split())[:300]}")
