"""Export a pruned (or dense) LLaMA / Mistral / Qwen2 folder as a GGUF file that llama.cpp serves.

The target is llama.cpp's ``deci`` architecture (NVIDIA's Nemotron-NAS models use it): a LLaMA
decoder whose metadata holds one head count, one KV-head count and one FFN width *per layer*, which
is exactly the shape of a pruned model. Facts this module relies on, from llama.cpp's own source
(src/models/deci.cpp, src/llama-model.cpp, as vendored in llama-cpp-python 0.3.36):

- ``deci.attention.head_count``, ``deci.attention.head_count_kv`` and ``deci.feed_forward_length``
  may be arrays with one entry per layer; query head i uses KV head i // (heads / kv_heads), the
  same contiguous grouping as transformers' ``repeat_kv``.
- The head size is read once, with layer 0's head count, so layer 0 must keep attention; the export
  writes key_length = value_length = rope dimension count = head_dim explicitly.
- A layer with FFN width 0 is skipped *entirely* by the graph (its attention output too), and a
  layer with 0 KV heads is Nemotron's "linear attention": neither is a pruned LLaMA layer, so both
  are refused.
- Optional biases: q/k/v (``blk.N.attn_{q,k,v}.bias``), ``blk.N.attn_output.bias`` and
  ``blk.N.ffn_{gate,up,down}.bias``: Qwen2's q/k/v biases and our regression biases all have a slot.
- RoPE is llama.cpp's "normal" (adjacent pairs) where transformers rotates halves, so q and k rows
  (and biases) are permuted within each head, per layer with that layer's own head counts.

Streaming: every tensor's shape is known from the safetensors headers, so the GGUF header and tensor
table are written first and the data then one layer at a time; each tensor is converted in row
blocks. Peak memory is about one stored layer plus the largest converted tensor (the embedding).
The file is written under a temporary name in the output folder and renamed when complete.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .architecture import LAYER_PREFIX, ModelShape, folder_config
from .architecture import adapter_of as config_adapter
from .checkpoint import CheckpointReader
from .errors import StreamPruneError
from .memory import peak_rss_mb

ARCH = "deci"
OUTTYPES = ("f32", "f16", "q8_0")
Q8_BLOCK = 32  # values per q8_0 block; a q8_0 tensor's rows must be a whole number of blocks
ROW_BLOCK_BYTES = 64 << 20  # convert at most this many bytes of float32 rows at once

# Hugging Face per-layer tensor suffix -> GGUF tensor name (llama-arch.cpp's LLM_TENSOR_NAMES).
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.down_proj.bias": "ffn_down.bias",
}
# Tensors whose rows are FFN channels (padded with zero channels for q8_0, see _ffn_width).
_FFN_ROWS = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.bias")


@dataclass(frozen=True)
class LayerShape:
    heads: int
    kv_heads: int
    ffn: int  # as stored
    ffn_written: int  # as written (zero-padded to whole q8_0 blocks for q8_0)


@dataclass
class ExportResult:
    path: Path
    bytes: int
    tensors: int
    seconds: float
    peak_rss_mb: float
    outtype: str


@dataclass(frozen=True)
class _Tensor:
    """One tensor of the output, in write order: where it comes from and how it is stored."""

    gguf_name: str
    source: str  # checkpoint tensor name ("" for rope_freqs, which is computed)
    shape: tuple[int, ...]  # as written (rows, cols) or (n,)
    qtype: int  # gguf.GGMLQuantizationType
    permute_heads: int = 0  # >0: q/k rows are permuted within heads of this many
    pad_rows: int = 0  # zero rows appended (FFN channels)
    pad_cols: int = 0  # zero columns appended (down_proj input channels)


def export_gguf(model_dir: str | Path, out_path: str | Path, outtype: str = "f16", overwrite: bool = False,
                log=None) -> ExportResult:
    """Write `model_dir` (a streamprune output or a dense LLaMA / Mistral / Qwen2 folder) to `out_path`."""
    gguf = _import_gguf()
    started = time.perf_counter()
    if outtype not in OUTTYPES:
        raise StreamPruneError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    out_path = Path(out_path)
    check_destination(out_path, overwrite)
    reader = CheckpointReader(model_dir)
    config, layers, rope = _model_plan(reader, outtype)
    from .gguf_vocab import read_vocab

    vocab = read_vocab(reader.model_dir, int(reader.shape("model.embed_tokens.weight")[0]))
    tensors = list(_tensor_plan(reader, config, layers, rope, outtype, gguf))
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)
        _write_metadata(writer, reader, config, layers, rope, vocab, outtype, gguf)
        for t in tensors:
            writer.add_tensor_info(t.gguf_name, t.shape, np.dtype(np.float32), _nbytes(t, gguf), raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t, data in _converted_tensors(reader, tensors, rope, gguf):
            writer.write_tensor_data(data)
            if log is not None and t.gguf_name.endswith("ffn_down.weight"):
                log(f"exported layer {t.gguf_name.split('.')[1]} of {len(layers)}")
        writer.close()
        os.replace(tmp, out_path)
    except OSError as exc:
        reason = _write_error(exc, out_path)
        raise StreamPruneError(f"writing {out_path} failed ({reason}); nothing was written") from None
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(path=out_path, bytes=out_path.stat().st_size, tensors=len(tensors),
                        seconds=time.perf_counter() - started, peak_rss_mb=peak_rss_mb(), outtype=outtype)


def _write_error(exc: OSError, out_path: Path) -> str:
    """The OS's reason; a short write has none (Python's buffered file reports the byte counts), so the
    free space is added to show whether the disk is full."""
    if exc.strerror:
        return exc.strerror
    try:
        free = f"; {shutil.disk_usage(out_path.parent).free / 1e6:,.0f} MB free there"
    except OSError:
        free = ""
    return f"{exc}{free}"


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise StreamPruneError("GGUF export needs the gguf package: pip install gguf") from None
    return gguf


def check_destination(out_path: str | Path, overwrite: bool) -> None:
    """Refuse an output path that cannot or may not be written (checked before any work is done)."""
    out_path = Path(out_path)
    if out_path.is_dir():
        raise StreamPruneError(f"{out_path} is a folder; give the path of the .gguf file to write")
    if out_path.exists() and not overwrite:
        raise StreamPruneError(f"{out_path} already exists; pass --overwrite to replace it")
    if not out_path.parent.is_dir():
        raise StreamPruneError(f"the folder {out_path.parent} does not exist")


# ------------------------------------------------------------------------------------ what to write


def _model_plan(reader: CheckpointReader, outtype: str) -> tuple:
    """The model's config, per-layer shapes and RoPE settings, refusing what deci cannot represent."""
    config, shape = folder_config(reader.config)
    if shape.adapter.qk_norm:
        raise StreamPruneError(f"cannot export {shape.family}: llama.cpp's deci architecture has no per-head "
                               "query/key norm (q_norm, k_norm)")
    if (act := getattr(config, "hidden_act", "silu")) != "silu":
        raise StreamPruneError(f"cannot export hidden_act={act!r}: llama.cpp's deci architecture uses SiLU")
    rope = _rope_settings(reader.config, shape.head_dim)
    layers = []
    for i in range(shape.num_layers):
        spec = config.layer_spec(i)
        heads, kv, ffn = spec["num_attention_heads"], spec["num_key_value_heads"], spec["intermediate_size"]
        if i == 0 and heads < 1:
            raise StreamPruneError("cannot export layer 0 without attention heads (llama.cpp reads the head size "
                                   "from it)")
        if heads < 1 or kv < 1:
            # deci would read 0 KV heads as Nemotron's "linear attention" and 0 heads as an attention-free
            # layer that ignores attn_output.bias; streamprune always keeps a head per KV group.
            raise StreamPruneError(f"cannot export layer {i} with {heads} attention heads and {kv} KV heads: "
                                   "llama.cpp's deci reads that as another kind of layer")
        if heads % kv:
            raise StreamPruneError(f"layer {i} has {heads} query heads for {kv} KV heads; llama.cpp needs a multiple")
        if ffn < 1:
            raise StreamPruneError(f"cannot export layer {i} with FFN width 0: llama.cpp's deci graph would also "
                                   "drop that layer's attention")
        layers.append(LayerShape(heads, kv, ffn, _ffn_width(ffn, outtype)))
        _check_layer_tensors(reader, i, spec, shape)
    return config, layers, rope


def _ffn_width(ffn: int, outtype: str) -> int:
    """q8_0 quantizes rows in blocks of 32 and down_proj's rows are FFN-wide: pad the FFN with zero
    channels (zero gate/up rows, zero down columns, so silu(0) * 0 adds exactly nothing)."""
    return ffn if outtype != "q8_0" else math.ceil(ffn / Q8_BLOCK) * Q8_BLOCK


def _check_layer_tensors(reader: CheckpointReader, i: int, spec: dict, shape: ModelShape) -> None:
    for name, want in shape.adapter.expected_layer_shapes(shape, i, spec).items():
        if not reader.has(name):
            raise StreamPruneError(f"tensor {name} is missing from the checkpoint in {reader.model_dir}")
        if tuple(reader.shape(name)) != want:
            raise StreamPruneError(f"{name} has shape {tuple(reader.shape(name))} but config.json implies {want}")


@dataclass(frozen=True)
class RopeSettings:
    theta: float
    scaling: str | None = None  # "linear" or None
    factor: float = 1.0
    llama3_factors: tuple[float, ...] | None = None  # per frequency, written as rope_freqs.weight


def _rope_settings(config: dict, head_dim: int) -> RopeSettings:
    """RoPE as llama.cpp's deci can run it: default, linear, or Llama-3.1's frequency factors."""
    params = dict(config.get("rope_parameters") or {})
    legacy = config.get("rope_scaling") or {}
    params = {**legacy, **params}
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.get("rope_type") or params.get("type") or "default"
    if float(config.get("partial_rotary_factor") or params.get("partial_rotary_factor") or 1.0) != 1.0:
        raise StreamPruneError("cannot export partial rotary embeddings: deci rotates the whole head")
    if kind == "default":
        return RopeSettings(theta)
    if kind == "linear":
        return RopeSettings(theta, "linear", float(params["factor"]))
    if kind == "llama3":
        return RopeSettings(theta, llama3_factors=_llama3_factors(params, theta, head_dim))
    raise StreamPruneError(f"cannot export rope_type {kind!r}: only default, linear and llama3 RoPE are carried")


def _llama3_factors(params: dict, theta: float, head_dim: int) -> tuple[float, ...]:
    """Llama-3.1's per-frequency divisors (transformers' `_compute_llama3_parameters`, as divisors)."""
    factor = float(params["factor"])
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    old_len = float(params["original_max_position_embeddings"])
    out = []
    for k in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (k / head_dim)
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return tuple(out)


def _tensor_plan(reader: CheckpointReader, config, layers: list[LayerShape], rope: RopeSettings, outtype: str,
                 gguf) -> Iterator[_Tensor]:
    """Every output tensor in the order it is written: embedding, layers front to back, head."""
    yield _matrix("token_embd.weight", "model.embed_tokens.weight", reader, outtype, gguf)
    if rope.llama3_factors:
        # One tensor shared by every layer (llama.cpp loads it for layer 0 and duplicates it).
        yield _Tensor("rope_freqs.weight", "", (len(rope.llama3_factors),), gguf.GGMLQuantizationType.F32)
    for i, layer in enumerate(layers):
        spec = config.layer_spec(i)
        prefix = LAYER_PREFIX.format(i)
        for name in _ordered(config_adapter(config).layer_tensor_names(i, spec), prefix):
            suffix = name[len(prefix):]
            target = f"blk.{i}.{_LAYER_NAMES[suffix]}"
            rotated = {"self_attn.q_proj": layer.heads, "self_attn.k_proj": layer.kv_heads}
            heads = rotated.get(suffix.rsplit(".", 1)[0], 0)
            pad = layer.ffn_written - layer.ffn
            if name.endswith(".weight") and len(reader.shape(name)) == 2:
                pad_cols = pad if suffix == "mlp.down_proj.weight" else 0
                yield _matrix(target, name, reader, outtype, gguf, heads, pad if suffix in _FFN_ROWS else 0, pad_cols)
            else:
                pad_rows = pad if suffix in _FFN_ROWS else 0
                rows = reader.shape(name)[0] + pad_rows
                # Norms and biases stay float32, as llama.cpp's own converter keeps every 1-D tensor.
                yield _Tensor(target, name, (rows,), gguf.GGMLQuantizationType.F32, heads, pad_rows)
    yield _Tensor("output_norm.weight", "model.norm.weight", tuple(reader.shape("model.norm.weight")),
                  gguf.GGMLQuantizationType.F32)
    if not config.tie_word_embeddings:
        yield _matrix("output.weight", "lm_head.weight", reader, outtype, gguf)


def _ordered(names: list[str], prefix: str) -> list[str]:
    """A layer's tensors in llama.cpp's customary order (attention, then FFN)."""
    order = list(_LAYER_NAMES)
    return sorted(names, key=lambda n: order.index(n[len(prefix):]))


def _matrix(target: str, source: str, reader: CheckpointReader, outtype: str, gguf, permute_heads: int = 0,
            pad_rows: int = 0, pad_cols: int = 0) -> _Tensor:
    rows, cols = reader.shape(source)
    rows, cols = rows + pad_rows, cols + pad_cols
    q = gguf.GGMLQuantizationType
    qtype = {"f32": q.F32, "f16": q.F16, "q8_0": q.Q8_0}[outtype]
    if qtype == q.Q8_0 and cols % Q8_BLOCK:
        qtype = q.F16  # rows that are not whole q8_0 blocks (only possible for odd hidden sizes)
    return _Tensor(target, source, (rows, cols), qtype, permute_heads, pad_rows, pad_cols)


def _nbytes(t: _Tensor, gguf) -> int:
    block, size = gguf.GGML_QUANT_SIZES[t.qtype]
    return math.prod(t.shape) // block * size


# ------------------------------------------------------------------------------------------ metadata


def _write_metadata(writer, reader: CheckpointReader, config, layers: list[LayerShape], rope: RopeSettings,
                    vocab, outtype: str, gguf) -> None:
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    writer.add_name(reader.model_dir.resolve().name)
    writer.add_file_type(int(ftype))
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_block_count(len(layers))
    writer.add_context_length(_context_length(reader.config))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_vocab_size(len(vocab.tokens))
    # Per-layer arrays: the heart of a pruned export (llama.cpp's get_key_or_arr takes one per layer).
    writer.add_feed_forward_length([layer.ffn_written for layer in layers])
    writer.add_head_count([layer.heads for layer in layers])
    writer.add_head_count_kv([layer.kv_heads for layer in layers])
    head_dim = int(config.head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope.theta)
    if rope.scaling == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope.factor)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    vocab.write(writer)


def _context_length(config: dict) -> int:
    """max_position_embeddings, or Mistral's sliding window when smaller: deci has no sliding-window
    attention, so within this length (and only there) it computes exactly what transformers does."""
    length = int(config.get("max_position_embeddings") or 2048)
    window = config.get("sliding_window")
    if config.get("model_type") == "qwen2" or config.get("base_model_type") == "qwen2":
        if config.get("use_sliding_window"):
            raise StreamPruneError("cannot export Qwen2 with use_sliding_window=true: deci has no sliding window")
        window = None
    return min(length, int(window)) if window else length


# ------------------------------------------------------------------------------------------- tensors


def _converted_tensors(reader: CheckpointReader, tensors: list[_Tensor], rope: RopeSettings, gguf):
    """(tensor, bytes to write) in plan order, reading the checkpoint one layer at a time."""
    by_group: dict[str, list[_Tensor]] = {}
    for t in tensors:
        by_group.setdefault(_group(t.gguf_name), []).append(t)
    for members in by_group.values():
        stored = reader.read([t.source for t in members if t.source])
        for t in members:
            if not t.source:
                yield t, np.asarray(rope.llama3_factors, dtype=np.float32)
                continue
            yield t, _convert(stored.pop(t.source), t, gguf)
        del stored


def _group(gguf_name: str) -> str:
    return ".".join(gguf_name.split(".")[:2]) if gguf_name.startswith("blk.") else gguf_name


def _convert(tensor: torch.Tensor, t: _Tensor, gguf) -> np.ndarray:
    """The tensor permuted, padded and encoded as `t.qtype`, converted a block of rows at a time."""
    if t.permute_heads:
        tensor = _rope_permute(tensor, t.permute_heads)
    if t.pad_rows or t.pad_cols:
        pads = (0, t.pad_cols, 0, t.pad_rows) if tensor.dim() == 2 else (0, t.pad_rows)
        tensor = torch.nn.functional.pad(tensor, pads)
    q = gguf.GGMLQuantizationType
    if tensor.dim() == 1 or t.qtype == q.F32:
        return tensor.to(torch.float32).numpy()
    rows, cols = tensor.shape
    step = max(1, ROW_BLOCK_BYTES // (4 * cols))
    if t.qtype == q.F16:
        out = np.empty((rows, cols), dtype=np.float16)
        for start in range(0, rows, step):
            out[start:start + step] = tensor[start:start + step].to(torch.float32).numpy()
        return out
    block, size = gguf.GGML_QUANT_SIZES[t.qtype]
    out = np.empty((rows, cols // block * size), dtype=np.uint8)
    for start in range(0, rows, step):
        out[start:start + step] = gguf.quants.quantize(tensor[start:start + step].to(torch.float32).numpy(), t.qtype)
    return out


def _rope_permute(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from transformers' halves (i, i + d/2) to llama.cpp's pairs (2i, 2i+1)."""
    rows = tensor.shape[0]
    half = rows // heads // 2
    return tensor.reshape(heads, 2, half, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape).contiguous()
