"""Optional dependencies, and one clear line naming the extra that provides a missing one.

Without this, a missing package surfaces deep inside another library (transformers' GGUF loader says
"install gguf" in a paragraph that never mentions streamprune), often minutes into a run.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import StreamPruneError

# Which `pip install 'streamprune[...]'` extra brings each optional module.
EXTRA_OF = {"gguf": "demo", "matplotlib": "demo", "ray": "ray"}


class MissingExtraError(StreamPruneError, ImportError):
    """An optional package is not installed; the message names the extra to install."""


def require(module: str, needed_for: str) -> ModuleType:
    """Import `module`, or raise a one-line error naming the extra: `pip install 'streamprune[demo]'`."""
    require_all([module], needed_for)
    return importlib.import_module(module)


def require_all(modules: list[str], needed_for: str) -> None:
    """Fail before any work when some of `modules` are missing, naming each one and its extra."""
    absent = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            absent.append(name)
    if not absent:
        return
    extras = sorted({EXTRA_OF[m] for m in absent if m in EXTRA_OF})
    hint = " ".join(f"pip install 'streamprune[{e}]'" for e in extras) or "pip install " + " ".join(absent)
    raise MissingExtraError(f"{needed_for} needs {' and '.join(absent)}, which {'is' if len(absent) == 1 else 'are'} "
                            f"not installed: {hint}")
