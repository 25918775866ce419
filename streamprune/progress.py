"""A progress line for steps that report nothing themselves (a library call that runs for many seconds)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm

TICK_S = 0.5


@contextmanager
def elapsed(desc: str, quiet: bool = False) -> Iterator[None]:
    """Show `desc: 12s` on stderr, updated twice a second, while the block runs."""
    if quiet:
        yield
        return
    bar = tqdm(total=None, desc=desc, bar_format="{desc}: {elapsed}", leave=True)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(TICK_S):
            bar.refresh()

    thread = threading.Thread(target=tick, name="streamprune-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()
