"""Tiny LLaMA GGUF files for tests, written the way llama.cpp's converter writes them.

`write_tiny_llama_gguf` builds a random `LlamaForCausalLM` plus the tiny byte-level tokenizer, and
writes both into one GGUF: F32 tensors under llama.cpp's names, the config as `llama.*` metadata and
the tokenizer as `tokenizer.ggml.*` metadata. It returns the torch model too, so a test can check
that whatever reads the file back reproduces that model exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tests.tokenizer_fixtures import BOS_ID, EOS_ID, SPECIAL_TOKENS, UNK_ID, make_tiny_tokenizer

# Exactly representable in float32, which is how GGUF stores it: a value like 1e-5 would come back
# as 9.99999974e-06 and make the round-trip logits differ in the last bits.
RMS_EPS = 2.0**-16
ROPE_THETA = 10000.0

# HF parameter name (within `model.layers.N.`) -> llama.cpp tensor name (within `blk.N.`).
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOKEN_TYPE_NORMAL, _TOKEN_TYPE_CONTROL = 1, 3


@dataclass
class TinyGGUF:
    path: Path
    model: LlamaForCausalLM  # the model the file was written from, in float32 and eval mode
    tokenizer: PreTrainedTokenizerFast


def make_tiny_llama(
    vocab: int, *, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, ffn: int = 128,
    tie: bool = True, seed: int = 0,
) -> LlamaForCausalLM:
    """A random LLaMA whose weights are large enough that a wrong permutation changes the logits."""
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
        rms_norm_eps=RMS_EPS, rope_theta=ROPE_THETA, tie_word_embeddings=tie,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model.eval()


def write_tiny_llama_gguf(
    path: Path, *, tie: bool = True, pre: str = "default", vocab: int = 300, seed: int = 0, **model_kwargs
) -> TinyGGUF:
    """Write a tiny F32 llama GGUF to `path`; `pre` is the llama.cpp pre-tokenizer name to record."""
    tokenizer = make_tiny_tokenizer(vocab, add_bos=False)
    model = make_tiny_llama(len(tokenizer), tie=tie, seed=seed, **model_kwargs)
    writer = gguf.GGUFWriter(str(path), "llama")
    _add_model_metadata(writer, model.config)
    _add_tokenizer_metadata(writer, tokenizer, pre)
    for name, array in _gguf_tensors(model):
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return TinyGGUF(Path(path), model, tokenizer)


def _add_model_metadata(writer: gguf.GGUFWriter, config: LlamaConfig) -> None:
    writer.add_name("tiny-llama")  # not "mistral...": transformers switches architecture on that name
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_vocab_size(config.vocab_size)


def _add_tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerFast, pre: str) -> None:
    """A byte-level BPE vocabulary the way llama.cpp stores one (`tokenizer.ggml.model` = "gpt2")."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    assert [vocab[t] for t in tokens] == list(range(len(tokens))), "ids must be dense for a token list"
    # tokenizers writes merges as pairs (new format) or "a b" strings (old); GGUF wants the latter.
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    types = [_TOKEN_TYPE_CONTROL if t in SPECIAL_TOKENS else _TOKEN_TYPE_NORMAL for t in tokens]
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_add_bos_token(False)


def _gguf_tensors(model: LlamaForCausalLM) -> list[tuple[str, np.ndarray]]:
    """(llama.cpp name, float32 array in torch's (out, in) order) for every tensor the file holds."""
    config = model.config
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tensors = [("token_embd.weight", state["model.embed_tokens.weight"])]
    for i in range(config.num_hidden_layers):
        for hf_name, gguf_name in _LAYER_NAMES.items():
            array = state[f"model.layers.{i}.{hf_name}"]
            if gguf_name == "attn_q.weight":
                array = rope_permute(array, config.num_attention_heads)
            elif gguf_name == "attn_k.weight":
                array = rope_permute(array, config.num_key_value_heads)
            tensors.append((f"blk.{i}.{gguf_name}", array))
    tensors.append(("output_norm.weight", state["model.norm.weight"]))
    if not config.tie_word_embeddings:  # llama.cpp omits the head when it is the embedding
        tensors.append(("output.weight", state["lm_head.weight"]))
    return [(name, np.ascontiguousarray(array)) for name, array in tensors]


def rope_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py `LlamaModel.permute`).

    HF rotates the two halves of each head, ggml rotates adjacent pairs; this interleaves the halves.
    transformers' `LlamaTensorProcessor._reverse_permute_weights` undoes it on load.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )
