"""Shared fixtures: tiny models are built once per session (they take a second each)."""

from __future__ import annotations

import os

import pytest
import torch

import streamprune
from tests.tiny_models import make_tiny_model, write_calib_text

# The suite must never reach the Hub; make any accidental attempt fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Tiny calibration, and the paper's attention share (attention_scale 1; the default keeps every head below
# 35 %) so that pruned test models have layers with different head counts, the shapes loading must handle.
CALIB = {"nsamples": 8, "seqlen": 16, "quiet": True, "dtype": "float32", "attention_scale": 1.0}


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Factory: models(name) -> folder, cached per session. Names are keys of MODEL_SPECS."""
    root = tmp_path_factory.mktemp("models")
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = make_tiny_model(root / name, **MODEL_SPECS[name])
        return cache[name]

    return get


MODEL_SPECS = {
    "llama-mha": {"family": "llama"},
    "llama-gqa": {"family": "llama", "kv_heads": 4},
    "llama-tied": {"family": "llama", "kv_heads": 2, "tie": True},
    "mistral-gqa": {"family": "mistral", "kv_heads": 2},
    "qwen2-gqa": {"family": "qwen2", "kv_heads": 4},
    # head_dim 16, not hidden // heads = 8: q_norm / k_norm and the projections must use the explicit one.
    "qwen3-gqa": {"family": "qwen3", "kv_heads": 2, "head_dim": 16, "tie": True},
    "llama-sharded": {"family": "llama", "kv_heads": 4, "max_shard_size": "60KB"},
    "llama-fp16": {"family": "llama", "kv_heads": 4, "dtype": torch.float16},
}


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    return write_calib_text(tmp_path_factory.mktemp("calib") / "calib.txt")


@pytest.fixture(scope="session")
def pruned(models, calib_file, tmp_path_factory):
    """Factory: pruned(name, ratio) -> PruneResult of `streamprune.prune` with the test calibration,
    run once per (model, ratio) per session. Tests only read its folder (`.out_dir`)."""
    root = tmp_path_factory.mktemp("pruned")
    cache: dict[tuple[str, float], streamprune.PruneResult] = {}

    def get(name: str, ratio: float) -> streamprune.PruneResult:
        if (name, ratio) not in cache:
            out = root / f"{name}-{ratio}"
            cache[name, ratio] = streamprune.prune(models(name), out, ratio, calib=str(calib_file), **CALIB)
        return cache[name, ratio]

    return get
@pytest.fixture
def hub_cache(models, tmp_path, monkeypatch):
    """A Hugging Face Hub cache holding `tiny-org/tiny-llama` (the llama-gqa tiny model), laid out as
    huggingface_hub lays it out (blobs, refs/main, snapshots/<commit> of links), with offline mode on."""
    import hashlib
    import shutil
    from types import SimpleNamespace

    cache = tmp_path / "hf-hub"
    repo = cache / "models--tiny-org--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for file in sorted(models("llama-gqa").iterdir()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return SimpleNamespace(repo_id="tiny-org/tiny-llama", cache=cache, snapshot=snapshot)
