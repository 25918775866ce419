"""A float64 reference forward of a DeciLM / Nemotron-NAS folder, written from the format as vLLM reads it.

Independent of streamprune's modeling code: it reads config.json as vLLM's ``nemotron_nas.py`` does
(query heads = num_attention_heads in every layer, KV heads = num_attention_heads // n_heads_in_group,
FFN width from ``ffn_mult`` when present, else ``intermediate_size``; ``qkv_bias`` / ``attention_bias`` /
``mlp_bias`` switched for the whole model) and insists that the checkpoint holds exactly the tensors that
reading implies, with their shapes (vLLM would silently skip an extra bias). Default RoPE only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file


def ffn_width(ffn: dict, hidden: int) -> int:
    if "ffn_mult" in ffn:
        width = int(2 * ffn["ffn_mult"] * hidden / 3)
        return width if width % 256 == 0 else width + 256 - width % 256
    return ffn["intermediate_size"]


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    c, heads, d = config["hidden_size"], config["num_attention_heads"], config["head_dim"]
    qkv_bias = config.get("qkv_bias", config.get("attention_bias", False))
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], c), "model.norm.weight": (c,)}
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (config["vocab_size"], c)
    for i, block in enumerate(config["block_configs"]):
        kv, f = heads // block["attention"]["n_heads_in_group"], ffn_width(block["ffn"], c)
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (c,), p + "post_attention_layernorm.weight": (c,),
                       p + "self_attn.q_proj.weight": (heads * d, c), p + "self_attn.k_proj.weight": (kv * d, c),
                       p + "self_attn.v_proj.weight": (kv * d, c), p + "self_attn.o_proj.weight": (c, heads * d),
                       p + "mlp.gate_proj.weight": (f, c), p + "mlp.up_proj.weight": (f, c),
                       p + "mlp.down_proj.weight": (c, f)})
        if qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (heads * d,), p + "self_attn.k_proj.bias": (kv * d,),
                           p + "self_attn.v_proj.bias": (kv * d,)})
        if config.get("attention_bias"):
            shapes[p + "self_attn.o_proj.bias"] = (c,)
        if config.get("mlp_bias"):
            shapes.update({p + "mlp.gate_proj.bias": (f,), p + "mlp.up_proj.bias": (f,),
                           p + "mlp.down_proj.bias": (c,)})
    return shapes


def load_decilm(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, float64 tensors), checked against the shapes the config implies."""
    config = json.loads((folder / "config.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update({k: v.double() for k, v in load_file(shard).items()})
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    assert got == expected_shapes(config), "tensors differ from what config.json implies"
    return config, tensors


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rope_tables(config: dict, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    rope = config.get("rope_parameters") or {}
    assert rope.get("rope_type", "default") == "default" and not config.get("rope_scaling")
    theta, d = float(rope.get("rope_theta", config.get("rope_theta", 10000.0))), config["head_dim"]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.outer(torch.arange(n, dtype=torch.float64), inv)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def attention(x: torch.Tensor, t: dict[str, torch.Tensor], p: str, heads: int, kv: int, d: int,
              tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Causal GQA attention of one layer (query head j uses KV head j // (heads // kv)), o_proj included."""
    n = x.shape[0]

    def proj(name: str, count: int) -> torch.Tensor:
        y = x @ t[p + f"self_attn.{name}_proj.weight"].T
        if p + f"self_attn.{name}_proj.bias" in t:
            y = y + t[p + f"self_attn.{name}_proj.bias"]
        return y.view(n, count, d).transpose(0, 1)

    q, k, v = proj("q", heads), proj("k", kv), proj("v", kv)
    q, k = _rotate(q, *tables), _rotate(k, *tables)
    k, v = k.repeat_interleave(heads // kv, 0), v.repeat_interleave(heads // kv, 0)
    scores = q @ k.transpose(1, 2) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, heads * d) @ t[p + "self_attn.o_proj.weight"].T
    return out + t[p + "self_attn.o_proj.bias"] if p + "self_attn.o_proj.bias" in t else out


def mlp(x: torch.Tensor, t: dict[str, torch.Tensor], p: str) -> torch.Tensor:
    def lin(name: str, y: torch.Tensor) -> torch.Tensor:
        out = y @ t[p + f"mlp.{name}.weight"].T
        return out + t[p + f"mlp.{name}.bias"] if p + f"mlp.{name}.bias" in t else out

    return lin("down_proj", torch.nn.functional.silu(lin("gate_proj", x)) * lin("up_proj", x))


@torch.no_grad()
def decilm_log_probs(folder: Path, ids: list[int]) -> torch.Tensor:
    """Next-token log-probabilities (float64, one row per position) of a DeciLM folder."""
    config, tensors = load_decilm(Path(folder))
    return log_probs(config, tensors, ids)


@torch.no_grad()
def source_log_probs(folder: Path, ids: list[int]) -> torch.Tensor:
    """The same float64 maths on a streamprune (or stock LLaMA) folder, layer sizes read from the tensors:
    compared with `decilm_log_probs`, only the layout differs, so the padding must change nothing."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update({k: v.double() for k, v in load_file(shard).items()})
    return log_probs(config, tensors, ids)


def log_probs(config: dict, t: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """Embedding, decoder layers (sizes from the tensor shapes), final norm, head; float64."""
    d, eps = config["head_dim"], config["rms_norm_eps"]
    tables = rope_tables(config, len(ids))
    x = t["model.embed_tokens.weight"][torch.tensor(ids)]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        heads, kv = t[p + "self_attn.q_proj.weight"].shape[0] // d, t[p + "self_attn.k_proj.weight"].shape[0] // d
        x = x + attention(_rms(x, t[p + "input_layernorm.weight"], eps), t, p, heads, kv, d, tables)
        x = x + mlp(_rms(x, t[p + "post_attention_layernorm.weight"], eps), t, p)
    head = t["model.embed_tokens.weight" if config.get("tie_word_embeddings") else "lm_head.weight"]
    return torch.log_softmax(_rms(x, t["model.norm.weight"], eps) @ head.T, dim=-1)
