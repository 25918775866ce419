"""Load a pruned (or dense) model folder without remote code."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import read_json
from .errors import StreamPruneError


def load_pruned(model_dir: str | Path, dtype: torch.dtype | str | None = None, device: str | None = None, **kwargs):
    """`StreamPruneForCausalLM` for a streamprune folder, the stock class for a stock one.

    Uses streamprune's own copy of the modeling code, so no `trust_remote_code` is needed.
    """
    from transformers import AutoModelForCausalLM

    from .modeling import StreamPruneForCausalLM

    model_dir = Path(model_dir)
    config = read_json(model_dir / "config.json") if (model_dir / "config.json").is_file() else None
    if config is None:
        raise StreamPruneError(f"{model_dir} has no config.json")
    cls = StreamPruneForCausalLM if config.get("model_type") == "streamprune" else AutoModelForCausalLM
    model = cls.from_pretrained(str(model_dir), dtype=dtype or "auto", **kwargs)
    if device is not None:
        model = model.to(device)
    return model.eval()


def load_tokenizer(model_dir: str | Path):
    """The folder's tokenizer. `AutoTokenizer` always reads config.json, and a pruned folder's config
    names its own configuration class (`auto_map`), so without `trust_remote_code=True` transformers
    would ask interactively; the code it runs is streamprune's configuration file in that folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True)
    except (OSError, ValueError) as exc:
        raise StreamPruneError(f"cannot load the tokenizer from {model_dir} ({exc})") from None
