#!/usr/bin/env python
"""Write LLaMA-shaped Hugging Face checkpoints with random weights at real layer shapes.

Meant for memory / speed benchmarks of the streaming engine: the model is never held in memory. Tensors
are generated one at a time, each shard is written as soon as its tensors exist and is then freed, so
peak RSS is about one shard (one decoder layer by default) on top of the interpreter.

Importable without side effects (other tools add tools/ to sys.path):

    from make_checkpoint import make_checkpoint
    make_checkpoint("/tmp/l7b", "llama2-7b", layers=2)
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import resource
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import click
import torch
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig

INDEX_NAME = "model.safetensors.index.json"
DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16}
INIT_STD = 0.02


@dataclass(frozen=True)
class Preset:
    """Architecture of one model family member; only what decides tensor shapes and config.json."""

    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int = 32000
    max_positions: int = 4096
    rope_theta: float = 10000.0
    # Extra rope_parameters beyond rope_type/rope_theta (e.g. the llama3 frequency-scaling knobs).
    rope_extra: dict[str, float | int | str] = field(default_factory=dict)
    rms_norm_eps: float = 1e-5
    bos_token_id: int = 1
    eos_token_id: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

PRESETS: dict[str, Preset] = {
    "tiny": Preset(hidden=64, ffn=160, heads=4, kv_heads=2, layers=2, vocab=256, max_positions=512),
    "llama2-7b": Preset(hidden=4096, ffn=11008, heads=32, kv_heads=32, layers=32),
    "llama2-13b": Preset(hidden=5120, ffn=13824, heads=40, kv_heads=40, layers=40),
    "llama2-70b": Preset(hidden=8192, ffn=28672, heads=64, kv_heads=8, layers=80),
    "llama3-8b": Preset(
        hidden=4096, ffn=14336, heads=32, kv_heads=8, layers=32, vocab=128256, max_positions=131072,
        rope_theta=500000.0, rope_extra=LLAMA3_ROPE, bos_token_id=128000, eos_token_id=128001,
    ),
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to generate: std=None means an RMSNorm weight (all ones)."""

    name: str
    shape: tuple[int, ...]
    std: float | None

    def nbytes(self, dtype: torch.dtype) -> int:
        return math.prod(self.shape) * dtype.itemsize


# ---------------------------------------------------------------------------------------------- planning


def resolve_preset(preset: str | Preset, layers: int | None = None, vocab: int | None = None) -> Preset:
    """Apply the --layers / --vocab overrides, keeping special-token ids inside a shrunk vocabulary."""
    spec = PRESETS[preset] if isinstance(preset, str) else preset
    spec = replace(spec, layers=layers if layers is not None else spec.layers,
                   vocab=vocab if vocab is not None else spec.vocab)
    if spec.layers < 1:
        raise ValueError(f"layers must be >= 1, got {spec.layers}")
    if spec.vocab < 3:
        raise ValueError(f"vocab must be >= 3 (bos/eos need ids), got {spec.vocab}")
    if max(spec.bos_token_id, spec.eos_token_id) >= spec.vocab:
        # A shrunk llama3 vocab cannot hold ids 128000/128001; fall back to llama2's ids.
        spec = replace(spec, bos_token_id=1, eos_token_id=2)
    return spec


def layer_tensors(spec: Preset, i: int) -> list[TensorSpec]:
    """Tensors of decoder layer i. Residual-branch outputs get GPT-2-style 1/sqrt(2L) scaling so the
    residual stream's variance stays bounded however many layers are stacked."""
    h, kv = spec.hidden, spec.kv_heads * spec.head_dim
    out_std = INIT_STD / math.sqrt(2 * spec.layers)
    p = f"model.layers.{i}"
    return [
        TensorSpec(f"{p}.input_layernorm.weight", (h,), None),
        TensorSpec(f"{p}.self_attn.q_proj.weight", (spec.heads * spec.head_dim, h), INIT_STD),
        TensorSpec(f"{p}.self_attn.k_proj.weight", (kv, h), INIT_STD),
        TensorSpec(f"{p}.self_attn.v_proj.weight", (kv, h), INIT_STD),
        TensorSpec(f"{p}.self_attn.o_proj.weight", (h, spec.heads * spec.head_dim), out_std),
        TensorSpec(f"{p}.post_attention_layernorm.weight", (h,), None),
        TensorSpec(f"{p}.mlp.gate_proj.weight", (spec.ffn, h), INIT_STD),
        TensorSpec(f"{p}.mlp.up_proj.weight", (spec.ffn, h), INIT_STD),
        TensorSpec(f"{p}.mlp.down_proj.weight", (h, spec.ffn), out_std),
    ]


def tensor_groups(spec: Preset) -> list[list[TensorSpec]]:
    """Natural shard groups in file order: embeddings, one group per decoder layer, final norm + head."""
    embed = [TensorSpec("model.embed_tokens.weight", (spec.vocab, spec.hidden), INIT_STD)]
    head = [
        TensorSpec("model.norm.weight", (spec.hidden,), None),
        TensorSpec("lm_head.weight", (spec.vocab, spec.hidden), INIT_STD),
    ]
    return [embed, *(layer_tensors(spec, i) for i in range(spec.layers)), head]


def parse_size(size: str | int) -> int:
    """'2GB' -> 2e9 bytes, '1.5GiB' -> 1.5 * 2**30 (same units as transformers' max_shard_size)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", size.upper())
    if not m:
        raise ValueError(f"cannot parse size {size!r}; use e.g. 2GB, 500MB, 1GiB or a byte count")
    number, unit = float(m.group(1)), m.group(2) or "B"
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0])
    return int(number * base**power)


def plan_shards(
    groups: list[list[TensorSpec]], dtype: torch.dtype, max_shard_size: str | int | None = None
) -> list[list[TensorSpec]]:
    """Without a limit each group is a shard. With one, pack tensors greedily in order like
    transformers does; a tensor larger than the limit gets a shard of its own (tensors are never split)."""
    if max_shard_size is None:
        return [list(g) for g in groups]
    limit = parse_size(max_shard_size)
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for t in (t for g in groups for t in g):
        if shards[-1] and used + t.nbytes(dtype) > limit:
            shards.append([])
            used = 0
        shards[-1].append(t)
        used += t.nbytes(dtype)
    return shards


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


# -------------------------------------------------------------------------------------------- generation


def tensor_seed(seed: int, name: str) -> int:
    """Seed derived from (seed, name) alone, so a tensor's values do not depend on sharding, layer
    count or generation order. sha256 rather than hash(): Python salts str hashes per process."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_tensor(t: TensorSpec, dtype: torch.dtype, seed: int) -> torch.Tensor:
    if t.std is None:
        return torch.ones(t.shape, dtype=dtype)
    gen = torch.Generator().manual_seed(tensor_seed(seed, t.name))
    # normal_ fills the half-precision buffer directly: no float32 temporary doubling the peak.
    return torch.empty(t.shape, dtype=dtype).normal_(0.0, t.std, generator=gen)


def write_shard(path: Path, shard: list[TensorSpec], dtype: torch.dtype, seed: int, bar: tqdm) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for t in shard:
        tensors[t.name] = make_tensor(t, dtype, seed)
        bar.update(t.nbytes(dtype))
    # safetensors >= 0.6 writes straight from the tensors' memory, so no serialized copy is built.
    save_file(tensors, str(path), metadata={"format": "pt"})
    tensors.clear()


def write_index(out_dir: Path, shards: list[list[TensorSpec]], dtype: torch.dtype) -> None:
    weight_map = {t.name: shard_name(i, len(shards)) for i, s in enumerate(shards) for t in s}
    total = sum(t.nbytes(dtype) for s in shards for t in s)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    # sort_keys + indent=2 matches what save_pretrained writes.
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------ config


def build_config(spec: Preset, dtype: str) -> LlamaConfig:
    """Config the transformers-5 way: rope_parameters (not rope_scaling/rope_theta) and dtype."""
    rope = {"rope_type": "default", "rope_theta": spec.rope_theta, **spec.rope_extra}
    return LlamaConfig(
        architectures=["LlamaForCausalLM"], dtype=dtype,
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.ffn,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim, max_position_embeddings=spec.max_positions, rms_norm_eps=spec.rms_norm_eps,
        rope_parameters=rope, tie_word_embeddings=False,
        bos_token_id=spec.bos_token_id, eos_token_id=spec.eos_token_id, pad_token_id=None,
    )


def write_configs(out_dir: Path, spec: Preset, dtype: str) -> None:
    build_config(spec, dtype).save_pretrained(out_dir)
    GenerationConfig(bos_token_id=spec.bos_token_id, eos_token_id=spec.eos_token_id).save_pretrained(out_dir)


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse to mix with an existing checkpoint: stale shards with another -of-N count would linger."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = [*out_dir.glob("model*.safetensors"), *out_dir.glob("model*.safetensors.index.json")]
    if stale and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds a checkpoint ({stale[0].name}); pass --overwrite / overwrite=True"
        )
    for p in stale:
        p.unlink()


def make_checkpoint(
    out_dir: str | Path,
    preset: str | Preset,
    layers: int | None = None,
    dtype: str = "float16",
    vocab: int | None = None,
    seed: int = 0,
    *,
    max_shard_size: str | int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write a random LlamaForCausalLM checkpoint to out_dir and return it.

    Deterministic in (preset, layers, vocab, dtype, seed): each tensor's values depend only on its name
    and the seed, never on max_shard_size. Peak memory is one shard (one decoder layer by default).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    spec = resolve_preset(preset, layers, vocab)
    torch_dtype = DTYPES[dtype]
    out = Path(out_dir)
    prepare_out_dir(out, overwrite)
    shards = plan_shards(tensor_groups(spec), torch_dtype, max_shard_size)
    total = sum(t.nbytes(torch_dtype) for s in shards for t in s)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress) as bar:
        for i, shard in enumerate(shards):
            write_shard(out / shard_name(i, len(shards)), shard, torch_dtype, seed, bar)
    # Index and config last: a folder interrupted mid-write is visibly incomplete, not silently loadable.
    write_index(out, shards, torch_dtype)
    write_configs(out, spec, dtype)
    return out


# --------------------------------------------------------------------------------------------------- CLI


def human_size(n: float) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    while n >= 1024 and len(units) > 1:
        n /= 1024
        units.pop(0)
    return f"{n:.2f} {units[0]}"


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def shard_files(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("model-*-of-*.safetensors"))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="tiny", show_default=True)
@click.option("--layers", type=click.IntRange(min=1), default=None, help="Override the layer count.")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="float16", show_default=True)
@click.option("--vocab", type=click.IntRange(min=3), default=None, help="Override the vocabulary size.")
@click.option("--max-shard-size", default=None, help="e.g. 2GB, 500MB; default: one decoder layer per shard.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace a checkpoint already in OUT_DIR.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def main(
    out_dir: Path, preset: str, layers: int | None, dtype: str, vocab: int | None,
    max_shard_size: str | None, seed: int, overwrite: bool, progress: bool,
) -> None:
    """Generate a random-weight LLaMA-shaped HF checkpoint in OUT_DIR without holding it in memory."""
    start = time.perf_counter()
    try:
        make_checkpoint(out_dir, preset, layers, dtype, vocab, seed,
                        max_shard_size=max_shard_size, overwrite=overwrite, progress=progress)
    except (FileExistsError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    elapsed = time.perf_counter() - start
    total = json.loads((out_dir / INDEX_NAME).read_text())["metadata"]["total_size"]
    files = shard_files(out_dir)
    on_disk = sum(p.stat().st_size for p in files)
    click.echo(
        f"wrote {out_dir}: {len(files)} shards, {human_size(total)} of tensors "
        f"({human_size(on_disk)} on disk) "
        f"in {elapsed:.2f} s ({human_size(total / max(elapsed, 1e-9))}/s); "
        f"peak RSS {human_size(peak_rss_bytes())}"
    )


if __name__ == "__main__":
    main()
