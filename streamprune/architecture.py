"""The model adapter: everything streamprune knows about a model family, in one place.

The engine, evaluation and export never spell a tensor name, build a decoder layer, embed tokens,
apply the final norm or make rotary tables themselves: they ask the family's `ModelAdapter`
(reached as `shape.adapter`). The supported families (LLaMA, Mistral, Qwen2, Qwen3) share Hugging
Face's tensor names and decoder-layer maths; they differ in which projections carry biases, and
Qwen3 normalises each query and key head (`q_norm`, `k_norm`: one weight of head_dim shared by all
heads, so head pruning leaves it unchanged). Adding a family means one `FAMILIES` entry, plus
modeling support in `streamprune/modeling` where its layer maths differs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from .errors import StreamPruneError
from .modeling import StreamPruneConfig, StreamPruneDecoderLayer

LAYER_PREFIX = "model.layers.{}."
EMBEDDING = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


def _never(_config: dict) -> bool:
    return False


def _attention_bias(config: dict) -> bool:
    return bool(config.get("attention_bias", False))


def _mlp_bias(config: dict) -> bool:
    return bool(config.get("mlp_bias", False))


@dataclass(frozen=True)
class ModelAdapter:
    """One model family: its projections' bias rules (read from config.json), whether it has per-head
    q/k norms, and the tensor names and maths outside the decoder layers.

    Checkpoints with fused projections (one qkv or gate_up tensor) would be split in `read_layer`, the
    only place layer tensors are read; no supported family needs it yet.
    """

    model_type: str
    qkv_bias: Callable[[dict], bool] = _never
    o_bias: Callable[[dict], bool] = _never
    mlp_bias: Callable[[dict], bool] = _never
    qk_norm: bool = False

    # -- tensor names ---------------------------------------------------------------------------

    def layer_tensor_names(self, layer_idx: int, spec: dict) -> list[str]:
        """Names of the tensors of one decoder layer, given its sizes and bias flags."""
        return list(self._layer_tensor_shapes(1, 1, layer_idx, spec))

    def expected_layer_shapes(self, shape: ModelShape, layer_idx: int, spec: dict) -> dict[str, tuple[int, ...]]:
        """The shape every tensor of a layer must have; used to check checkpoints against config.json."""
        return self._layer_tensor_shapes(shape.hidden_size, shape.head_dim, layer_idx, spec)

    def _layer_tensor_shapes(self, c: int, d: int, layer_idx: int, spec: dict) -> dict[str, tuple[int, ...]]:
        q, kv, ffn = spec["num_attention_heads"] * d, spec["num_key_value_heads"] * d, spec["intermediate_size"]
        shapes: dict[str, tuple[int, ...]] = {
            "input_layernorm.weight": (c,), "post_attention_layernorm.weight": (c,),
            "self_attn.q_proj.weight": (q, c), "self_attn.k_proj.weight": (kv, c),
            "self_attn.v_proj.weight": (kv, c), "self_attn.o_proj.weight": (c, q),
            "mlp.gate_proj.weight": (ffn, c), "mlp.up_proj.weight": (ffn, c), "mlp.down_proj.weight": (c, ffn),
        }
        if self.qk_norm:
            shapes.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
        if spec["qkv_bias"]:
            shapes.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                           "self_attn.v_proj.bias": (kv,)})
        if spec["o_bias"]:
            shapes["self_attn.o_proj.bias"] = (c,)
        if spec["mlp_bias"]:
            shapes.update({"mlp.gate_proj.bias": (ffn,), "mlp.up_proj.bias": (ffn,)})
        if spec["down_bias"]:
            shapes["mlp.down_proj.bias"] = (c,)
        prefix = LAYER_PREFIX.format(layer_idx)
        return {prefix + k: v for k, v in shapes.items()}

    @staticmethod
    def non_layer_tensor_names(shape: ModelShape) -> list[str]:
        """Embedding, final norm and (untied) lm_head, in the order the output shards hold them."""
        return [EMBEDDING, FINAL_NORM] + ([] if shape.tie_word_embeddings else [LM_HEAD])

    @staticmethod
    def output_weight_name(shape: ModelShape) -> str:
        """The matrix that maps the final hidden state to logits (the embedding when tied)."""
        return EMBEDDING if shape.tie_word_embeddings else LM_HEAD

    # -- reading and building layers ------------------------------------------------------------

    def read_layer(self, reader, layer_idx: int, spec: dict) -> dict[str, torch.Tensor]:
        """One layer's tensors at their full names, as the layer module and the pruning code expect."""
        return reader.read(self.layer_tensor_names(layer_idx, spec))

    def engine_config(self, config: dict, shape: ModelShape, layer_specs: list[dict] | None = None
                      ) -> StreamPruneConfig:
        """A `StreamPruneConfig` describing the model (dense unless `layer_specs` is given).

        The engine builds its decoder layers from this config, and the pruned folder's config.json is
        this config too, so the layers that compute the calibration statistics are exactly the layers
        users load.
        """
        kwargs = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "auto_map")}
        kwargs.update(head_dim=shape.head_dim, attention_bias=False, mlp_bias=False, qk_norm=self.qk_norm)
        specs = layer_specs or [shape.dense_layer_spec() for _ in range(shape.num_layers)]
        return StreamPruneConfig(layer_configs=specs, base_model_type=shape.family, **kwargs)

    @staticmethod
    def layer_module(config: StreamPruneConfig, layer_idx: int) -> StreamPruneDecoderLayer:
        """The decoder layer module for `config` (build it under `torch.device("meta")` to skip init)."""
        return StreamPruneDecoderLayer(config, layer_idx)

    # -- maths outside the decoder layers -------------------------------------------------------

    @staticmethod
    def embed(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Input hidden states in float32. (A family that scales its embedding, as Gemma does, would
        multiply here; none of the supported ones does.)"""
        if int(ids.max()) >= weight.shape[0]:
            raise StreamPruneError("token ids exceed the embedding size; tokenizer and model disagree")
        return weight[ids].float()

    @staticmethod
    def final_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """The final RMSNorm: normalise in float32, then scale in the weight's dtype."""
        x = hidden.to(weight.device, torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return x.to(weight.dtype) * weight

    @staticmethod
    def rotary_tables(config: StreamPruneConfig, seqlen: int, device: torch.device, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for positions 0..seqlen-1 from the config's rope parameters."""
        rotary = LlamaRotaryEmbedding(config).to(device)
        probe = torch.empty(1, dtype=dtype, device=device)
        return rotary(probe, torch.arange(seqlen, device=device)[None, :])


FAMILIES: dict[str, ModelAdapter] = {
    "llama": ModelAdapter("llama", qkv_bias=_attention_bias, o_bias=_attention_bias, mlp_bias=_mlp_bias),
    "mistral": ModelAdapter("mistral"),
    "qwen2": ModelAdapter("qwen2", qkv_bias=lambda _c: True),
    "qwen3": ModelAdapter("qwen3", qkv_bias=_attention_bias, o_bias=_attention_bias, qk_norm=True),
}


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a dense model, the only architecture facts the pruning code needs."""

    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool

    @property
    def adapter(self) -> ModelAdapter:
        """The family's adapter: tensor names, layer construction, embedding, final norm, rotary tables."""
        return FAMILIES[self.family]

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def is_gqa(self) -> bool:
        return self.num_kv_heads < self.num_heads

    def dense_layer_spec(self) -> dict:
        return {
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "intermediate_size": self.intermediate_size,
            "qkv_bias": self.qkv_bias,
            "o_bias": self.o_bias,
            "mlp_bias": self.mlp_bias,
            "down_bias": self.mlp_bias,
        }


def read_shape(config: dict) -> ModelShape:
    """Validate a config.json dict and return its `ModelShape`; unsupported families raise."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise StreamPruneError(
            f"unsupported architecture {model_type!r} (model_type in config.json); "
            f"streamprune supports {supported}"
        )
    family = FAMILIES[model_type]
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        shape = ModelShape(
            family=model_type,
            num_layers=int(config["num_hidden_layers"]),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate_size=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=family.qkv_bias(config),
            o_bias=family.o_bias(config),
            mlp_bias=family.mlp_bias(config),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StreamPruneError(f"config.json is missing or has a bad value for {exc}") from None
    if shape.num_heads % shape.num_kv_heads:
        raise StreamPruneError("config.json: num_attention_heads is not a multiple of num_key_value_heads")
    return shape


def adapter_of(config: StreamPruneConfig) -> ModelAdapter:
    """The adapter of the family a `StreamPruneConfig` was made from."""
    return FAMILIES[config.base_model_type]


def folder_config(config: dict) -> tuple[StreamPruneConfig, ModelShape]:
    """Layer config and dense shape of any folder streamprune reads: a stock family or a pruned one."""
    if config.get("model_type") == "streamprune":
        base = dict(config, model_type=config.get("base_model_type", "llama"))
        shape = read_shape(base)
        kwargs = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "auto_map")}
        return StreamPruneConfig(**kwargs), shape
    shape = read_shape(config)
    return shape.adapter.engine_config(config, shape), shape
