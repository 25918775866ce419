"""tools/make_checkpoint.py: random LLaMA-shaped checkpoints written shard by shard."""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

# tools/ is not a package: other scripts import it this way, so the test does too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import make_checkpoint as mc  # noqa: E402

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def tiny_expected_shapes(layers: int = 2, vocab: int = 256) -> dict[str, tuple[int, ...]]:
    """Written out independently of the tool's own plan: hidden 64, FFN 160, 4 heads x 16, 2 kv heads."""
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, 64),
        "model.norm.weight": (64,),
        "lm_head.weight": (vocab, 64),
    }
    per_layer = {
        "input_layernorm": (64,), "post_attention_layernorm": (64,),
        "self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
        "self_attn.o_proj": (64, 64),
        "mlp.gate_proj": (160, 64), "mlp.up_proj": (160, 64), "mlp.down_proj": (64, 160),
    }
    for i in range(layers):
        shapes.update({f"model.layers.{i}.{k}.weight": v for k, v in per_layer.items()})
    return shapes


def read_index(path: Path) -> dict:
    return json.loads((path / mc.INDEX_NAME).read_text())


def load_all(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("model-*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def data_bytes(shard: Path) -> int:
    """Tensor payload of a safetensors file: file size minus the 8-byte length and the JSON header."""
    with shard.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    return shard.stat().st_size - 8 - header_len


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tiny_checkpoint_layout(tmp_path: Path, dtype: str) -> None:
    out = mc.make_checkpoint(tmp_path / "ckpt", "tiny", dtype=dtype)
    expected = tiny_expected_shapes()
    index = read_index(out)
    assert set(index["weight_map"]) == set(expected)
    # Default sharding: embeddings, one shard per decoder layer, norm + lm_head.
    shard_names = sorted(set(index["weight_map"].values()))
    assert shard_names == [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    assert index["weight_map"]["model.layers.1.mlp.down_proj.weight"] == "model-00003-of-00004.safetensors"

    tensors = load_all(out)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    assert all(t.dtype == TORCH_DTYPES[dtype] for t in tensors.values())
    for shard in shard_names:  # every tensor sits in the shard the index names
        with safe_open(out / shard, framework="pt") as f:
            assert {k for k, v in index["weight_map"].items() if v == shard} == set(f.keys())

    itemsize = TORCH_DTYPES[dtype].itemsize
    total = sum(math.prod(s) for s in expected.values()) * itemsize
    assert index["metadata"]["total_size"] == total
    assert sum(data_bytes(out / s) for s in shard_names) == total

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == dtype
    assert config["rope_parameters"]["rope_type"] == "default" and not config["tie_word_embeddings"]
    assert GenerationConfig.from_pretrained(out).eos_token_id == 2


def test_weight_statistics(tmp_path: Path) -> None:
    tensors = load_all(mc.make_checkpoint(tmp_path, "tiny", layers=8, vocab=4096))
    assert torch.equal(tensors["model.norm.weight"], torch.ones(64, dtype=torch.float16))
    assert tensors["model.embed_tokens.weight"].float().std().item() == pytest.approx(0.02, rel=0.05)
    # Residual-branch outputs are scaled by 1/sqrt(2 * layers) so deep stacks stay well-conditioned.
    down = torch.cat([tensors[f"model.layers.{i}.mlp.down_proj.weight"].flatten() for i in range(8)])
    assert down.float().std().item() == pytest.approx(0.02 / 4, rel=0.05)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_loads_in_transformers(tmp_path: Path, dtype: str) -> None:
    out = mc.make_checkpoint(tmp_path, "tiny", dtype=dtype, seed=3)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == TORCH_DTYPES[dtype]
    # Loaded weights are the file's weights, not a fresh init that happened to fill the same names.
    on_disk = load_all(out)
    assert torch.equal(model.lm_head.weight.data, on_disk["lm_head.weight"])
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 12, 256) and torch.isfinite(logits).all()
    # min_new_tokens: a random model may well pick eos (id 2) among 256 tokens.
    generated = model.generate(ids[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 16)


def test_deterministic_and_independent_of_sharding(tmp_path: Path) -> None:
    a = load_all(mc.make_checkpoint(tmp_path / "a", "tiny", seed=7))
    b = load_all(mc.make_checkpoint(tmp_path / "b", "tiny", seed=7, max_shard_size="40KB"))
    c = load_all(mc.make_checkpoint(tmp_path / "c", "tiny", seed=8))
    assert len(read_index(tmp_path / "b")["weight_map"]) == len(a)
    assert len(list((tmp_path / "b").glob("model-*.safetensors"))) > 4  # really sharded differently
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[q], c[q])
    # Same bytes on disk for the same arguments, run to run.
    mc.make_checkpoint(tmp_path / "a2", "tiny", seed=7)
    for shard in (tmp_path / "a").glob("model-*.safetensors"):
        assert shard.read_bytes() == (tmp_path / "a2" / shard.name).read_bytes()


def test_max_shard_size_packing() -> None:
    groups = mc.tensor_groups(mc.resolve_preset("tiny"))
    shards = mc.plan_shards(groups, torch.float16, "40KB")
    assert [t.name for s in shards for t in s] == [t.name for g in groups for t in g]  # order kept
    # Over the limit only when a single tensor is (embed / lm_head are 32 KiB; 2 x 20 KiB FFN > 40 KB).
    assert all(len(s) == 1 or sum(t.nbytes(torch.float16) for t in s) <= 40_000 for s in shards)
    assert mc.parse_size("2GB") == 2 * 10**9 and mc.parse_size("1.5GiB") == 3 * 2**29
    assert mc.parse_size("500mb") == 5 * 10**8 and mc.parse_size(123) == 123
    with pytest.raises(ValueError):
        mc.parse_size("2 lots")


@pytest.mark.parametrize(
    ("preset", "params"),
    [("llama2-7b", 6_738_415_616), ("llama2-13b", 13_015_864_320),
     ("llama2-70b", 68_976_648_192), ("llama3-8b", 8_030_261_248)],
)
def test_presets_match_published_parameter_counts(preset: str, params: int) -> None:
    groups = mc.tensor_groups(mc.resolve_preset(preset))
    assert sum(math.prod(t.shape) for g in groups for t in g) == params


def test_llama3_config(tmp_path: Path) -> None:
    config = mc.build_config(mc.resolve_preset("llama3-8b", layers=2), "bfloat16")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.rope_parameters == {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
    }
    assert (loaded.num_key_value_heads, loaded.vocab_size, loaded.bos_token_id) == (8, 128256, 128000)
    # A shrunk vocab cannot hold llama3's special ids, so they fall back inside it.
    small = mc.resolve_preset("llama3-8b", vocab=1000)
    assert (small.bos_token_id, small.eos_token_id) == (1, 2)


def test_refuses_to_mix_checkpoints(tmp_path: Path) -> None:
    mc.make_checkpoint(tmp_path, "tiny")
    with pytest.raises(FileExistsError):
        mc.make_checkpoint(tmp_path, "tiny", layers=1)
    mc.make_checkpoint(tmp_path, "tiny", layers=1, overwrite=True)
    assert len(list(tmp_path.glob("model-*.safetensors"))) == 3  # no stale -of-00004 shards left
    with pytest.raises(ValueError):
        mc.make_checkpoint(tmp_path / "x", "tiny", dtype="float32")


def test_cli(tmp_path: Path) -> None:
    args = [str(tmp_path), "--preset", "tiny", "--layers", "1", "--vocab", "128", "--dtype", "bfloat16",
            "--seed", "5", "--no-progress"]
    result = CliRunner().invoke(mc.main, args)
    assert result.exit_code == 0, result.output
    assert "3 shards" in result.output and "peak RSS" in result.output
    assert read_index(tmp_path)["weight_map"].keys() == tiny_expected_shapes(layers=1, vocab=128).keys()
    assert CliRunner().invoke(mc.main, args).exit_code != 0  # existing checkpoint without --overwrite
