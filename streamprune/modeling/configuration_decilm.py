"""Configuration of a DeciLM / Nemotron-NAS folder written by ``streamprune export --format decilm``.

Copied into every such folder and reached through ``auto_map`` (``trust_remote_code=True``), so it
imports nothing but ``transformers``. It is a configuration class only: serving engines (vLLM's
``nemotron_nas.py``, SGLang, TensorRT-LLM, mlx-lm) bring their own DeciLM model code and read
``block_configs[i].attention`` / ``.ffn`` as *attributes* (``hasattr(block.ffn, "ffn_mult")`` decides
between ``ffn_mult`` and ``intermediate_size``), which is why the dicts of config.json become
namespaces here and a key absent from the JSON stays absent as an attribute.
"""

from __future__ import annotations

from types import SimpleNamespace

from transformers import LlamaConfig


def _namespace(value):
    """A dict (recursively) as attributes; anything else unchanged."""
    if isinstance(value, dict):
        return SimpleNamespace(**{k: _namespace(v) for k, v in value.items()})
    return value


def _plain(value):
    """The inverse of `_namespace`, for config.json."""
    if isinstance(value, SimpleNamespace):
        return {k: _plain(v) for k, v in vars(value).items()}
    return value


class StreamPruneDeciLMConfig(LlamaConfig):
    """A ``LlamaConfig`` plus ``block_configs`` (one ``{attention: {...}, ffn: {...}}`` per layer) and
    ``qkv_bias`` (q/k/v biases apart from ``attention_bias``, which then covers o_proj only, as vLLM
    reads it)."""

    model_type = "nemotron-nas"

    def __init__(self, block_configs: list | None = None, qkv_bias: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.block_configs = [_namespace(b) for b in block_configs or []]
        self.qkv_bias = qkv_bias

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["block_configs"] = [_plain(b) for b in self.block_configs]
        return out
