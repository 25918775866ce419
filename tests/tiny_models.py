"""Tiny random LLaMA / Mistral / Qwen2 / Qwen3 checkpoints for tests, saved as real HF folders with a tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from tests.tokenizer_fixtures import make_tiny_tokenizer

VOCAB = 320
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}

# Calibration text for tests: plain English, long enough for a few dozen 16-token windows.
CALIB_TEXT = (
    "Structured pruning removes whole attention heads and feed-forward channels from a transformer. "
    "The pruned model is smaller and faster on any hardware, and it needs no special kernels. "
    "Calibration text is run through the model to measure which heads and channels matter most. "
    "Once upon a time there was a little village by the sea where fishermen mended their nets. "
    "In mathematics, a matrix is a rectangular array of numbers arranged in rows and columns. "
) * 6


def make_tiny_model(
    path: Path,
    family: str = "llama",
    *,
    layers: int = 4,
    hidden: int = 64,
    heads: int = 8,
    kv_heads: int | None = None,
    head_dim: int | None = None,
    ffn: int = 160,
    tie: bool = False,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    seed: int = 0,
    vocab: int = VOCAB,
    tokenizer: bool = True,
) -> Path:
    """Save a random model with a tokenizer to `path` and return it. Weights are scaled up from the
    default init so heads and channels differ clearly in importance (a flat model prunes arbitrarily).
    `head_dim` defaults to hidden // heads (Qwen3's own default, 128, is far too big for a tiny model)."""
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(
        head_dim=head_dim or hidden // heads,
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads or heads, max_position_embeddings=256,
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.rand_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.05)
            else:
                # Per-row scales make some heads / channels matter much more than others.
                scale = torch.exp(torch.randn(p.shape[0], 1) * 0.5) if p.dim() == 2 else 1.0
                p.copy_(torch.randn_like(p) * 0.08 * scale)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    if tokenizer:  # False: the caller writes its own (e.g. a SentencePiece one)
        make_tiny_tokenizer(vocab).save_pretrained(path)
    return path


def write_calib_text(path: Path) -> Path:
    path.write_text(CALIB_TEXT)
    return path
