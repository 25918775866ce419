"""Per-family adapters: read a LLaMA / Mistral / Qwen2 config.json into one `ModelShape`.

All supported families share Hugging Face's tensor names and decoder-layer maths; they differ only in
which projections carry biases (and Mistral's sliding window). Everything downstream works from
`ModelShape` and `StreamPruneConfig`, so adding a family means adding one `Family` entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import StreamPruneError
from .modeling import StreamPruneConfig

LAYER_PREFIX = "model.layers.{}."
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    """How one model family sets the bias flags of its projections."""

    qkv_bias: Callable[[dict], bool]
    o_bias: Callable[[dict], bool]
    mlp_bias: Callable[[dict], bool]


FAMILIES: dict[str, Family] = {
    "llama": Family(
        qkv_bias=lambda c: bool(c.get("attention_bias", False)),
        o_bias=lambda c: bool(c.get("attention_bias", False)),
        mlp_bias=lambda c: bool(c.get("mlp_bias", False)),
    ),
    "mistral": Family(qkv_bias=lambda c: False, o_bias=lambda c: False, mlp_bias=lambda c: False),
    "qwen2": Family(qkv_bias=lambda c: True, o_bias=lambda c: False, mlp_bias=lambda c: False),
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


def engine_config(config: dict, shape: ModelShape, layer_specs: list[dict] | None = None) -> StreamPruneConfig:
    """A `StreamPruneConfig` describing the model (dense unless `layer_specs` is given).

    The engine builds its decoder layers from this config, and the pruned folder's config.json is this
    config too, so the layers that compute the calibration statistics are exactly the layers users load.
    """
    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "auto_map")}
    kwargs.update(head_dim=shape.head_dim, attention_bias=False, mlp_bias=False)
    specs = layer_specs or [shape.dense_layer_spec() for _ in range(shape.num_layers)]
    return StreamPruneConfig(layer_configs=specs, base_model_type=shape.family, **kwargs)


def layer_tensor_names(layer_idx: int, spec: dict) -> list[str]:
    """Names of the tensors of one decoder layer, given its bias flags."""
    prefix = LAYER_PREFIX.format(layer_idx)
    names = [f"{prefix}input_layernorm.weight", f"{prefix}post_attention_layernorm.weight"]
    names += [f"{prefix}self_attn.{p}.weight" for p in ATTN_PROJ]
    names += [f"{prefix}mlp.{p}.weight" for p in MLP_PROJ]
    if spec["qkv_bias"]:
        names += [f"{prefix}self_attn.{p}.bias" for p in ("q_proj", "k_proj", "v_proj")]
    if spec["o_bias"]:
        names.append(f"{prefix}self_attn.o_proj.bias")
    if spec["mlp_bias"]:
        names += [f"{prefix}mlp.{p}.bias" for p in ("gate_proj", "up_proj")]
    if spec["down_bias"]:
        names.append(f"{prefix}mlp.down_proj.bias")
    return names


def expected_layer_shapes(shape: ModelShape, layer_idx: int, spec: dict) -> dict[str, tuple[int, ...]]:
    """The shape every tensor of a layer must have; used to check checkpoints against config.json."""
    c, d = shape.hidden_size, shape.head_dim
    q, kv, ffn = spec["num_attention_heads"] * d, spec["num_key_value_heads"] * d, spec["intermediate_size"]
    prefix = LAYER_PREFIX.format(layer_idx)
    shapes = {
        "input_layernorm.weight": (c,), "post_attention_layernorm.weight": (c,),
        "self_attn.q_proj.weight": (q, c), "self_attn.k_proj.weight": (kv, c),
        "self_attn.v_proj.weight": (kv, c), "self_attn.o_proj.weight": (c, q),
        "mlp.gate_proj.weight": (ffn, c), "mlp.up_proj.weight": (ffn, c), "mlp.down_proj.weight": (c, ffn),
        "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.bias": (c,), "mlp.gate_proj.bias": (ffn,), "mlp.up_proj.bias": (ffn,),
        "mlp.down_proj.bias": (c,),
    }
    wanted = set(layer_tensor_names(layer_idx, spec))
    return {prefix + k: v for k, v in shapes.items() if prefix + k in wanted}


def non_layer_tensor_names(shape: ModelShape) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not shape.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def folder_config(config: dict) -> tuple[StreamPruneConfig, ModelShape]:
    """Layer config and dense shape of any folder streamprune reads: a stock family or a pruned one."""
    if config.get("model_type") == "streamprune":
        base = dict(config, model_type=config.get("base_model_type", "llama"))
        shape = read_shape(base)
        kwargs = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "auto_map")}
        return StreamPruneConfig(**kwargs), shape
    shape = read_shape(config)
    return engine_config(config, shape), shape
