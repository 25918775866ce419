"""Fault injection for crash tests: `STREAMPRUNE_FAULT=<point>` kills the process with SIGKILL there.

Resume must survive a power cut at any moment; the tests prove it by killing a real run at named
points (`pass1:<layer>`, `pass2:<layer>`, `write:<shard>`, `finalize`) and running it again.
`int@<point>` sends SIGINT instead (a user's Ctrl-C). The check is one environment lookup per point,
so it costs nothing in normal runs.
"""

from __future__ import annotations

import os
import signal

ENV = "STREAMPRUNE_FAULT"


def fault_point(name: str) -> None:
    wanted = os.environ.get(ENV)
    if wanted == name:
        os.kill(os.getpid(), signal.SIGKILL)
    elif wanted == f"int@{name}":
        os.kill(os.getpid(), signal.SIGINT)
