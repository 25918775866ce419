"""MODEL_DIR as a local folder or a Hugging Face Hub repo id (`org/name`), resolved through the Hub cache.

A repo id is looked up in huggingface_hub's cache first (`snapshot_download(local_files_only=True)`),
so a model downloaded once works offline. Only when it is not cached, and Hugging Face offline mode
is off, is it downloaded. Anything that fails becomes one line saying what to do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import StreamPruneError

# What the Hub accepts as a repo id: `name` or `org/name` of letters, digits, '-', '_' and '.'.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
# Only the files a model folder needs (not the .bin / .gguf / onnx copies many repos also carry).
_MODEL_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.py", "*.jinja"]
_TRUE = ("1", "ON", "YES", "TRUE")


def resolve_model_dir(name: str | Path, what: str = "MODEL_DIR") -> Path:
    """`name` itself when it exists on disk, else the cached (or freshly downloaded) Hub snapshot."""
    path = Path(name).expanduser()
    if path.exists() or not looks_like_repo_id(str(name)):
        return path
    return _hub_snapshot(str(name), what)


def looks_like_repo_id(name: str) -> bool:
    return bool(_REPO_ID.fullmatch(name)) and not name.endswith((".", "-")) and ".." not in name


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them once, at import)."""
    return any(os.environ.get(k, "").strip().upper() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_snapshot(repo_id: str, what: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise StreamPruneError(f"{what} {repo_id}: no such folder (Hub repo ids need huggingface_hub: "
                               "pip install huggingface_hub)") from None
    # HF_HUB_CACHE is read here, not at import, so a cache chosen after start-up is honoured.
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_MODEL_FILES, cache_dir=cache_dir,
                                      local_files_only=True))
    except Exception:  # noqa: BLE001 - any miss means "not in the cache"; try the network below
        pass
    if hub_offline():
        raise StreamPruneError(f"{what} {repo_id}: no such folder, and not in the Hugging Face cache "
                               "(offline mode is on); download it first or pass a local folder")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_MODEL_FILES, cache_dir=cache_dir))
    except Exception as exc:  # noqa: BLE001 - network, auth, missing repo: all one line for the user
        detail = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise StreamPruneError(f"{what} {repo_id}: no such folder, not in the Hugging Face cache, and the "
                               f"download failed ({type(exc).__name__}: {detail}); pass a local folder") from None
