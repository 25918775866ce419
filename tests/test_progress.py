"""The elapsed-time line shown while a silent library call runs."""

from __future__ import annotations

import threading
import time

from streamprune import progress


def test_elapsed_line_ticks_while_the_block_runs_and_stops_after(capsys, monkeypatch):
    monkeypatch.setattr(progress, "TICK_S", 0.01)
    with progress.elapsed("reading"):
        time.sleep(0.1)
    err = capsys.readouterr().err
    assert err.count("reading: ") >= 3  # refreshed while waiting, not only at the start and end
    assert not any(t.name == "streamprune-progress" for t in threading.enumerate())


def test_quiet_shows_nothing(capsys):
    with progress.elapsed("reading", quiet=True):
        pass
    assert capsys.readouterr().err == ""
