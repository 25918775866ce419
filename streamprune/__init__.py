"""streamprune: layer-streaming, low-memory SlimLLM structured pruning for LLaMA-family models."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# The public names load torch and transformers (seconds); they are imported on first use, so the
# command line can answer --help and show its first progress line before that.
_LAZY = {"PruneOptions": ".engine", "PruneResult": ".engine", "prune": ".engine", "read_report": ".engine",
         "StreamPruneError": ".errors", "load_pruned": ".loading"}

__all__ = ["PruneOptions", "PruneResult", "StreamPruneError", "__version__", "load_pruned", "prune", "read_report"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
