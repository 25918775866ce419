"""The streaming engine end to end on tiny random models: targets, loading, generation, inputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import streamprune
from tests.conftest import CALIB

IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]])


def _load_tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def _param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # transformers dedupes tied weights


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-gqa", "llama-tied", "qwen3-gqa"])
def test_ratio_zero_reproduces_the_input_model(models, calib_file, tmp_path, name):
    src = models(name)
    streamprune.prune(src, tmp_path / "out", 0.0, calib=str(calib_file), **CALIB)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] != "streamprune"  # nothing pruned: a stock folder, no remote code
    dense = AutoModelForCausalLM.from_pretrained(src)
    same = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(dense(IDS).logits, same(IDS).logits)


@pytest.mark.parametrize(
    ("name", "gqa_mode", "ratio"),
    [
        ("llama-mha", "heads", 0.1),
        ("llama-mha", "heads", 0.2),
        ("llama-mha", "heads", 0.5),
        ("llama-gqa", "heads", 0.2),
        ("llama-gqa", "heads", 0.3),
        ("llama-gqa", "groups", 0.2),
        ("llama-gqa", "groups", 0.5),
        ("qwen2-gqa", "heads", 0.2),
        ("qwen2-gqa", "groups", 0.4),
        ("llama-tied", "heads", 0.25),
        ("mistral-gqa", "heads", 0.2),
        ("qwen3-gqa", "heads", 0.3),
        ("qwen3-gqa", "groups", 0.3),
    ],
)
def test_parameter_target_is_hit_and_output_loads(models, calib_file, tmp_path, name, gqa_mode, ratio):
    src, out = models(name), tmp_path / "out"
    result = streamprune.prune(src, out, ratio, calib=str(calib_file), gqa_mode=gqa_mode, **CALIB)
    report = result.report
    dense = AutoModelForCausalLM.from_pretrained(src)
    pruned = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    before, after = _param_count(dense), _param_count(pruned)
    assert report["params_before"] == before and report["params_after"] == after
    assert abs((before - after) / before - ratio) <= 0.005
    assert abs(report["achieved_ratio"] - ratio) <= 0.005
    assert torch.isfinite(pruned(IDS).logits).all()
    # Layers really differ in size, and every layer stays a valid (grouped-query) attention layer.
    layer_cfgs = AutoConfig.from_pretrained(out, trust_remote_code=True).layer_configs
    assert len({(c["num_attention_heads"], c["intermediate_size"]) for c in layer_cfgs}) > 1
    for cfg in layer_cfgs:
        assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0
        assert cfg["num_attention_heads"] >= 1 and cfg["intermediate_size"] >= 1


@pytest.mark.parametrize("name", ["llama-mha", "llama-gqa", "qwen2-gqa", "mistral-gqa", "qwen3-gqa"])
def test_pruned_model_generates_with_kv_cache_in_plain_transformers(pruned, name):
    out = pruned(name, 0.3).out_dir
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    cached = remote.generate(IDS, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    uncached = remote.generate(IDS, max_new_tokens=8, do_sample=False, min_new_tokens=8, use_cache=False)
    assert cached.shape == (1, IDS.shape[1] + 8)
    assert torch.equal(cached, uncached)
    own = streamprune.load_pruned(out)  # streamprune's own loader, no remote code
    assert type(own).__name__ == "StreamPruneForCausalLM"
    torch.testing.assert_close(own(IDS).logits, remote(IDS).logits, rtol=0, atol=0)


def test_sharded_and_single_file_inputs_give_identical_outputs(models, calib_file, tmp_path):
    single, sharded = models("llama-gqa"), models("llama-sharded")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 3
    assert (single / "model.safetensors").is_file()
    for src, out in ((single, tmp_path / "a"), (sharded, tmp_path / "b")):
        streamprune.prune(src, out, 0.25, calib=str(calib_file), **CALIB)
    a, b = _load_tensors(tmp_path / "a"), _load_tensors(tmp_path / "b")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_output_folder_layout_and_report(pruned):
    out = pruned("llama-gqa", 0.3).out_dir
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "configuration_streamprune.py",
        "modeling_streamprune.py",
        "streamprune_report.json",
    } <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl", ".tmp")) for n in names)  # never pickle, no scratch
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {n for n in names if n.endswith(".safetensors")}
    report = streamprune.read_report(out)
    assert len(report["layers"]) == 4
    for layer in report["layers"]:
        assert {"score", "plan_ratio", "heads_kept", "channels_kept", "params_before", "params_after"} <= set(layer)
    pruned = [layer for layer in report["layers"] if layer["channels_kept"] < layer["channels_total"]]
    assert pruned and all("down_proj_fit" in layer for layer in pruned)
    phases = {"read", "build", "dense_forward", "forward", "statistics", "scoring", "regression", "write", "copy"}
    assert phases <= set(report["timings_seconds"]) and "peak_rss_mb" in report


def test_regression_lowers_every_sublayer_error(pruned):
    report = pruned("llama-mha", 0.5).report
    fits = [layer[k] for layer in report["layers"] for k in ("o_proj_fit", "down_proj_fit") if k in layer]
    assert len(fits) >= 4
    for fit in fits:
        assert fit["mse_recovered"] <= fit["mse_removed"] * (1 + 1e-9)
    assert any(fit["mse_recovered"] < 0.9 * fit["mse_removed"] for fit in fits)


def test_greedy_search_never_lowers_similarity_in_a_run(pruned):
    report = pruned("llama-mha", 0.5).report
    heads = [layer for layer in report["layers"] if "similarity_initial" in layer]
    assert heads
    for layer in heads:
        assert layer["similarity_final"] >= layer["similarity_initial"] - 1e-9


def test_fp16_checkpoint_is_written_in_fp16(models, calib_file, tmp_path):
    out = tmp_path / "out"
    streamprune.prune(models("llama-fp16"), out, 0.2, calib=str(calib_file), **CALIB)
    tensors = _load_tensors(out)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


@pytest.mark.slow
def test_output_loads_and_generates_without_streamprune_installed(pruned, tmp_path):
    """Remote code must need transformers only: block `import streamprune` in a fresh interpreter."""
    import subprocess
    import sys

    out = pruned("qwen2-gqa", 0.3).out_dir
    code = (
        "import sys; sys.modules['streamprune'] = None\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        "ids = torch.tensor([[1, 40, 41, 42]])\n"
        "out = m.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)\n"
        "print(type(m).__name__, tuple(out.shape))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("StreamPruneForCausalLM (1, 10)")


def test_fp16_compute_matches_fp32_compute(models, calib_file, tmp_path):
    """fp16 forwards with float64 statistics choose the same structure as fp32 and nearly the same weights."""
    from streamprune.evaluation import EvalSettings, evaluate, text_windows
    from streamprune.loading import load_tokenizer
    from tests.tiny_models import CALIB_TEXT

    src = models("llama-gqa")
    opts = {**CALIB, "nsamples": 16}
    reports = {}
    for dtype in ("float32", "float16"):
        reports[dtype] = streamprune.prune(
            src, tmp_path / dtype, 0.3, calib=str(calib_file), **{**opts, "dtype": dtype}
        ).report
    for a, b in zip(reports["float32"]["layers"], reports["float16"]["layers"], strict=True):
        assert a["kept_heads"] == b["kept_heads"] and a["channels_kept"] == b["channels_kept"]
    windows = text_windows(CALIB_TEXT, load_tokenizer(src), 16)
    float32 = EvalSettings(dtype="float32")
    pruning_error = evaluate(tmp_path / "float32", windows, reference_dir=src, settings=float32).kl_from_reference
    fp16_error = evaluate(tmp_path / "float16", windows, reference_dir=tmp_path / "float32",
                          settings=float32).kl_from_reference
    assert fp16_error < 1e-3 * pruning_error


@pytest.mark.parametrize(
    "options",
    [{"paper": None}, {"selection": "refit"}, {"target": "dense"}, {"protect_lowest": 0.1},
     {"selection": "refit", "gqa_mode": "groups"}, {"split": "search", "target": "dense"},
     {"split": "search", "split_samples": 3, "target": "dense"}],
    ids=["paper", "refit-selection", "dense-target", "protect-lowest", "refit-groups", "split-search-dense-target",
         "split-subset-dense-target"],
)
def test_every_method_option_hits_the_target_and_lowers_the_removal_error(models, calib_file, tmp_path, options):
    if "paper" in options:
        options = dict(streamprune.engine.PAPER_METHOD)
    src, out = models("qwen2-gqa"), tmp_path / "out"
    report = streamprune.prune(src, out, 0.3, calib=str(calib_file), **{**CALIB, **options}).report
    assert abs(report["achieved_ratio"] - 0.3) <= 0.005
    assert all(report["options"][k] == v for k, v in options.items())
    pruned = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert _param_count(pruned) == report["params_after"] and torch.isfinite(pruned(IDS).logits).all()
    fits = [layer[k] for layer in report["layers"] for k in ("o_proj_fit", "down_proj_fit") if k in layer]
    assert fits
    if options.get("target") != "dense":  # a dense-model target is not the sub-layer's own output
        assert all(fit["mse_recovered"] <= fit["mse_removed"] * (1 + 1e-6) for fit in fits)


def test_a_calibration_mixture_runs_through_the_engine(models, calib_file, tmp_path):
    calib = f"{calib_file}+self"
    report = streamprune.prune(models("llama-gqa"), tmp_path / "out", 0.3, calib=calib, **CALIB).report
    assert report["options"]["calib"] == calib and abs(report["achieved_ratio"] - 0.3) <= 0.005
