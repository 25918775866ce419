"""Work shared between runs of one model: the calibration ids and the dense pass's layer scores.

Runs of one model at several ratios (a batch, Ray tasks, or `streamprune run --shared-cache DIR` in two
terminals) need the same calibration ids and the same dense-pass scores. Each is stored once in DIR as
an entry named by `entry_key`, which covers everything the entry depends on and nothing else (not the
ratio). A run checks, fills or reads an entry only while it holds `locked(entry)`, an exclusive
`flock` on `<entry>.lock` beside it: concurrent runs compute each entry once, the first one to take
the lock computes it while the others wait and then read it. The kernel releases the lock when its
holder dies, so a killed run never leaves an entry locked. (flock works on local filesystems and, on
Linux, on NFS; a Ray cluster's shared cache folder needs one of those.)

The lock files stay (they are empty): deleting one while another process has it open would let two
processes lock two different files under the same name.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .options import PruneOptions

SUFFIXES = {"calibration": "safetensors", "dense-scores": "json"}  # entry kind -> file suffix


def entry_key(model_fingerprint: str, options: PruneOptions, device_type: str, dtype: str) -> str:
    """Identity of everything the calibration ids and the dense pass depend on (not the ratio).

    `device_type` is 'cpu' or 'cuda' (not the index: any GPU gives the same scores), `dtype` the compute
    dtype as str(torch dtype). The engine reports the key as `shared_cache_key`, which is how a batch
    knows which jobs shared an entry.
    """
    key = {"model": model_fingerprint, "calib": options.calib, "nsamples": options.nsamples,
           "seqlen": options.seqlen, "seed": options.seed, "device": device_type, "dtype": dtype}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def entry_path(cache_dir: Path, kind: str, key: str) -> Path:
    """Where the entry of `kind` ('calibration' or 'dense-scores') with `key` lives; creates `cache_dir`."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    return cache_dir / f"{kind}-{key}.{SUFFIXES[kind]}"


def lock_path(entry: Path) -> Path:
    return entry.with_name(entry.name + ".lock")


@contextlib.contextmanager
def locked(entry: Path | None) -> Iterator[None]:
    """Hold the entry's lock for the block (waiting for another holder); no-op when there is no cache."""
    if entry is None:
        yield
        return
    fd = os.open(lock_path(entry), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the only descriptor of the open file releases its flock


__all__ = ["entry_key", "entry_path", "lock_path", "locked"]
