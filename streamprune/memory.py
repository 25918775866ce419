"""Host-memory helpers: the peak RSS figure reports carry, and returning freed memory to the OS.

glibc's malloc serves blocks below its mmap threshold from heaps that it rarely gives back, and it
raises that threshold (up to 32 MiB) every time a large block is freed. A layer-streaming run frees
and reallocates tens of MiB-sized activation and weight blocks per layer, so the heaps fill with
free-but-resident memory: on the 7B-shaped benchmark that was 180 MB of the peak RSS (2068 MB with
the default, 1892 MB with a fixed 1 MiB threshold, same wall time). A fixed threshold makes every
block of 1 MiB or more its own mapping, returned to the OS the moment it is freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys

_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def return_freed_memory_promptly() -> bool:
    """Fix glibc's mmap threshold at 1 MiB for this process; False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
