"""Host-memory helpers: the peak RSS figure reports carry, and returning freed memory to the OS.

glibc's malloc serves blocks below its mmap threshold from heaps that it rarely gives back, and it
raises that threshold (up to 32 MiB) every time a large block is freed. A layer-streaming run frees
and reallocates tens of MiB-sized activation and weight blocks per layer, so the heaps fill with
free-but-resident memory. Fixing the threshold makes every block above it its own mapping, returned
to the OS the moment it is freed. Measured on the 2-core CPU (docs/performance.md), pruning the
7B-shaped 2-layer checkpoint (32 x 128) and SmolLM2-135M at 20 %:

    glibc default              SmolLM2: 17.2-17.7 s, 682-701 MB
    threshold 1 MiB            7B: 1767 MB, 80.5 s    SmolLM2: 26.2-26.7 s, 574-577 MB
    threshold 4 MiB, trim 256  7B: 1767 MB, 79.5 s    SmolLM2: 17.6 s, 690 MB

(An earlier commit's 7B 4-layer run went from 2068 MB with the default to 1892 MB with 1 MiB.)

Fixing the mmap threshold also fixes the trim threshold at twice its value, and trimming the heap
top after every free is what slowed the small model; hence the explicit, larger trim threshold.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys

_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 4 << 20
TRIM_THRESHOLD_BYTES = 256 << 20


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def return_freed_memory_promptly() -> bool:
    """Fix glibc's mmap and trim thresholds for this process; False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                    and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
