"""Configuration of a pruned LLaMA-family model whose decoder layers may differ in size.

This file is copied into every pruned model folder and loaded there with
``trust_remote_code=True``, so it must import nothing but ``transformers``.
"""

from __future__ import annotations

from transformers import LlamaConfig

# Per-layer keys: sizes and which projections carry a bias. Missing keys mean "as the global config".
LAYER_SIZE_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
LAYER_BIAS_KEYS = ("qkv_bias", "o_bias", "mlp_bias", "down_bias")


class StreamPruneConfig(LlamaConfig):
    """A ``LlamaConfig`` plus ``layer_configs``: one dict per decoder layer.

    Each dict may set ``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size`` and the
    bias flags ``qkv_bias`` (q/k/v), ``o_bias``, ``mlp_bias`` (gate/up) and ``down_bias``. Regression
    recovery gives pruned layers an o_proj and down_proj bias, and Qwen2 has q/k/v biases, so the
    flags are per projection rather than Llama's single ``attention_bias``. ``head_dim`` is always
    explicit because pruning heads changes ``hidden_size // num_attention_heads``. ``qk_norm`` marks
    per-head query/key RMSNorms (Qwen3); their weights have head_dim entries, whatever the head count.
    """

    model_type = "streamprune"

    def __init__(self, layer_configs: list[dict] | None = None, base_model_type: str = "llama",
                 qk_norm: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.layer_configs = layer_configs
        self.base_model_type = base_model_type
        self.qk_norm = qk_norm

    def layer_spec(self, layer_idx: int) -> dict:
        """Sizes and bias flags of one layer, with global defaults filled in."""
        spec = {
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "intermediate_size": self.intermediate_size,
            "qkv_bias": bool(self.attention_bias),
            "o_bias": bool(self.attention_bias),
            "mlp_bias": bool(self.mlp_bias),
            "down_bias": bool(self.mlp_bias),
        }
        if self.layer_configs is not None:
            spec.update(self.layer_configs[layer_idx])
        return spec
