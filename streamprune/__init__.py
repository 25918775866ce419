"""streamprune: layer-streaming, low-memory SlimLLM structured pruning for LLaMA-family models."""

__version__ = "0.1.0"

from .engine import PruneOptions, PruneResult, prune, read_report  # noqa: E402
from .errors import StreamPruneError  # noqa: E402
from .loading import load_pruned  # noqa: E402

__all__ = ["PruneOptions", "PruneResult", "StreamPruneError", "__version__", "load_pruned", "prune", "read_report"]
