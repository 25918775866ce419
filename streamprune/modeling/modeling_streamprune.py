"""Modeling code of a pruned LLaMA-family model whose decoder layers may differ in size.

Copied into every pruned model folder (``trust_remote_code=True``), so it imports nothing but
``torch`` and ``transformers``. Each layer is the stock ``LlamaDecoderLayer`` built from a per-layer
copy of the config, so attention kernels, KV cache and generation are exactly transformers' own;
only the projections whose bias flags differ from Llama's single ``attention_bias`` are rebuilt, and
a model with per-head query/key norms (``qk_norm``: Qwen3) uses transformers' ``Qwen3Attention``.
"""

from __future__ import annotations

import copy

from torch import nn
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

try:  # inside a model folder the config sits next to this file
    from .configuration_streamprune import StreamPruneConfig
except ImportError:  # pragma: no cover - imported as a top-level module
    from configuration_streamprune import StreamPruneConfig


def _linear_like(old: nn.Linear, bias: bool) -> nn.Linear:
    """A linear layer of the same shape with or without a bias."""
    if (old.bias is not None) == bias:
        return old
    return nn.Linear(old.in_features, old.out_features, bias=bias)


class StreamPruneDecoderLayer(LlamaDecoderLayer):
    """A ``LlamaDecoderLayer`` with this layer's own head counts, FFN width and bias flags."""

    def __init__(self, config: StreamPruneConfig, layer_idx: int):
        spec = config.layer_spec(layer_idx)
        local = copy.copy(config)  # shallow: only the size fields below are replaced
        local.num_attention_heads = spec["num_attention_heads"]
        local.num_key_value_heads = spec["num_key_value_heads"]
        local.intermediate_size = spec["intermediate_size"]
        local.attention_bias = spec["qkv_bias"]
        local.mlp_bias = spec["mlp_bias"]
        super().__init__(local, layer_idx)
        if getattr(config, "qk_norm", False):
            # Same projections, plus RMSNorm over each query and key head before the rotary embedding.
            self.self_attn = Qwen3Attention(local, layer_idx)
        attn = self.self_attn
        # Attention reads the attention implementation from its config at run time: point it at the
        # shared config so `set_attn_implementation` on the model reaches every layer.
        attn.config = config
        attn.o_proj = _linear_like(attn.o_proj, spec["o_bias"])
        self.mlp.down_proj = _linear_like(self.mlp.down_proj, spec["down_bias"])


class StreamPrunePreTrainedModel(LlamaPreTrainedModel):
    config_class = StreamPruneConfig
    _no_split_modules = ["StreamPruneDecoderLayer"]


class StreamPruneModel(StreamPrunePreTrainedModel, LlamaModel):
    """``LlamaModel`` whose layers are built per layer; ``forward`` is inherited unchanged."""

    def __init__(self, config: StreamPruneConfig):
        StreamPrunePreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [StreamPruneDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class StreamPruneForCausalLM(StreamPrunePreTrainedModel, LlamaForCausalLM):
    """Causal LM head over ``StreamPruneModel``; generation and KV cache come from transformers."""

    def __init__(self, config: StreamPruneConfig):
        StreamPrunePreTrainedModel.__init__(self, config)
        self.model = StreamPruneModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
