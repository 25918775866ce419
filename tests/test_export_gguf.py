"""GGUF export, checked by llama.cpp itself (llama-cpp-python) against transformers on tiny models.

Error measure: max |llama.cpp logit - transformers logit| over every position and vocabulary entry,
divided by max |transformers logit| (an element-wise ratio is meaningless for logits near zero).
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import streamprune
from streamprune.cli import main
from streamprune.errors import StreamPruneError
from streamprune.export_gguf import export_gguf
from streamprune.loading import load_pruned, load_tokenizer
from tests.conftest import CALIB

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(
    not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (pip install -e '.[test]' builds it from source)"
)
PROMPT = "The quick brown fox jumps over the lazy dog. Layer 42 keeps 3 heads."
# Measured on these tiny models (see docs/serving.md); f32 is the bar, f16 / q8_0 are what the
# formats cost plus a margin.
TOLERANCE = {"f32": 1e-3, "f16": 1e-2, "q8_0": 3e-2}
GEN_TOKENS = 16

# name -> (source model, pruning options or None for the dense model)
CASES = {
    "mha-dense": ("llama-mha", None),
    "mha-pruned": ("llama-mha", {"ratio": 0.3}),
    "gqa-heads": ("llama-gqa", {"ratio": 0.3, "gqa_mode": "heads"}),
    "gqa-groups": ("llama-gqa", {"ratio": 0.4, "gqa_mode": "groups"}),
    "tied-pruned": ("llama-tied", {"ratio": 0.25}),
    "one-layer-far": ("llama-gqa", {"ratio": 0.15, "num_pruned_layers": 1}),
    "affine-biases": ("llama-gqa", {"ratio": 0.3, "recovery": "affine"}),
    "qwen2-pruned": ("qwen2-gqa", {"ratio": 0.3}),
    "mistral-pruned": ("mistral-gqa", {"ratio": 0.3}),
}


@pytest.fixture(scope="module")
def case_dir(models, calib_file, tmp_path_factory):
    """case_dir(name) -> model folder, pruned once per module."""
    root = tmp_path_factory.mktemp("export-cases")
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            source, options = CASES[name]
            if options is None:
                cache[name] = models(source)
            else:
                options = dict(options)
                ratio = options.pop("ratio")
                streamprune.prune(models(source), root / name, ratio, calib=str(calib_file), **options, **CALIB)
                cache[name] = root / name
        return cache[name]

    return get


def _transformers_logits(model_dir, ids: list[int]) -> np.ndarray:
    model = load_pruned(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _llama(path):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=128, n_batch=128, logits_all=True, n_threads=1, verbose=False)


def _llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def _relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def _greedy_transformers(model_dir, ids: list[int], n: int) -> list[int]:
    model = load_pruned(model_dir, dtype=torch.float32)
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


def _greedy_llama(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def _layer_shapes(model_dir) -> list[tuple[int, int, int]]:
    config = json.loads((model_dir / "config.json").read_text())
    specs = config.get("layer_configs") or [config] * config["num_hidden_layers"]
    kv = config.get("num_key_value_heads")
    return [(s["num_attention_heads"], s.get("num_key_value_heads", kv), s["intermediate_size"]) for s in specs]


@needs_llama_cpp
@pytest.mark.parametrize("name", list(CASES))
def test_llama_cpp_logits_and_greedy_tokens_match_transformers_f32(case_dir, tmp_path, name):
    model_dir = case_dir(name)
    out = export_gguf(model_dir, tmp_path / "model.gguf", "f32").path
    ids = load_tokenizer(model_dir)(PROMPT)["input_ids"]
    llm = _llama(out)
    assert llm.tokenize(PROMPT.encode(), add_bos=True, special=False) == ids  # same tokens as transformers
    error = _relative_error(_llama_logits(llm, ids), _transformers_logits(model_dir, ids))
    assert error <= TOLERANCE["f32"], f"{name}: relative logit error {error:.2e}"
    assert _greedy_llama(llm, ids, GEN_TOKENS) == _greedy_transformers(model_dir, ids, GEN_TOKENS)


def test_the_cases_cover_what_the_export_must_carry(case_dir):
    """The pruned cases really differ per layer, in both GQA modes, and carry the regression biases."""
    heads = _layer_shapes(case_dir("gqa-heads"))
    groups = _layer_shapes(case_dir("gqa-groups"))
    far = _layer_shapes(case_dir("one-layer-far"))
    assert len({h for h, _, _ in heads}) > 1 and all(kv == 4 for _, kv, _ in heads)  # heads mode keeps KV heads
    assert len({kv for _, kv, _ in groups}) > 1  # groups mode drops whole KV groups
    assert far[-1][2] * 5 < far[0][2] and far[:-1] == [far[0]] * (len(far) - 1)  # one layer pruned far more
    config = json.loads((case_dir("affine-biases") / "config.json").read_text())
    assert any(spec["o_bias"] and spec["down_bias"] for spec in config["layer_configs"])


@needs_llama_cpp
@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
@pytest.mark.parametrize("name", ["gqa-heads", "one-layer-far"])
def test_llama_cpp_logits_match_within_the_format_tolerance(case_dir, tmp_path, name, outtype):
    model_dir = case_dir(name)
    out = export_gguf(model_dir, tmp_path / "model.gguf", outtype).path
    ids = load_tokenizer(model_dir)(PROMPT)["input_ids"]
    error = _relative_error(_llama_logits(_llama(out), ids), _transformers_logits(model_dir, ids))
    assert error <= TOLERANCE[outtype], f"{name} {outtype}: relative logit error {error:.2e}"


@needs_llama_cpp
def test_llama_cpp_reads_the_per_layer_shapes_and_the_chat_template(case_dir, tmp_path):
    from gguf import GGUFReader

    model_dir = case_dir("gqa-groups")
    out = export_gguf(model_dir, tmp_path / "model.gguf", "f16").path
    fields = GGUFReader(out).fields
    shapes = _layer_shapes(model_dir)
    assert [int(v) for v in fields["deci.attention.head_count"].contents()] == [h for h, _, _ in shapes]
    assert [int(v) for v in fields["deci.attention.head_count_kv"].contents()] == [kv for _, kv, _ in shapes]
    assert [int(v) for v in fields["deci.feed_forward_length"].contents()] == [f for _, _, f in shapes]
    llm = _llama(out)
    assert llm.metadata["general.architecture"] == "deci"
    assert llm.n_vocab() == 320


def test_q8_0_pads_ffn_widths_to_whole_blocks_with_zero_channels(case_dir, tmp_path):
    from gguf import GGUFReader

    model_dir = case_dir("one-layer-far")
    out = export_gguf(model_dir, tmp_path / "model.gguf", "q8_0").path
    widths = [int(v) for v in GGUFReader(out).fields["deci.feed_forward_length"].contents()]
    assert widths == [-(-f // 32) * 32 for _, _, f in _layer_shapes(model_dir)]


# ------------------------------------------------------------------------------------------ bad input


def _export_cli(*args: str):
    return CliRunner().invoke(main, ["export", *map(str, args)])


def _assert_one_line_error(result, message: str) -> None:
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1


def test_cli_exports_and_refuses_to_overwrite_without_the_flag(models, tmp_path):
    out = tmp_path / "m.gguf"
    result = _export_cli(models("llama-gqa"), out, "--outtype", "q8_0", "--quiet")
    assert result.exit_code == 0, result.output
    assert "exported 39 tensors (q8_0" in result.output and out.read_bytes()[:4] == b"GGUF"
    before = out.read_bytes()
    _assert_one_line_error(_export_cli(models("llama-gqa"), out), "already exists; pass --overwrite")
    assert out.read_bytes() == before
    assert _export_cli(models("llama-gqa"), out, "--overwrite", "--outtype", "f32", "-q").exit_code == 0
    assert out.stat().st_size > len(before)


def test_cli_refuses_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    _assert_one_line_error(_export_cli(tmp_path / "empty", tmp_path / "m.gguf"), "has no config.json")
    _assert_one_line_error(_export_cli(tmp_path / "missing", tmp_path / "m.gguf"), "does not exist")
    assert list(tmp_path.glob("*.gguf*")) == [] and list(tmp_path.glob(".*")) == []


def _edited_copy(src, dst, edit) -> object:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_cli_refuses_what_llama_cpp_cannot_represent(models, case_dir, tmp_path):
    def arch(c):
        c["model_type"] = "gpt2"

    def rope(c):
        c["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}

    def no_heads_first(c):
        c["layer_configs"][0]["num_attention_heads"] = 0

    def no_ffn(c):
        c["layer_configs"][2]["intermediate_size"] = 0

    cases = [
        (models("llama-gqa"), arch, "unsupported architecture 'gpt2'"),
        (models("llama-gqa"), rope, "cannot export rope_type 'yarn'"),
        (case_dir("gqa-heads"), no_heads_first, "cannot export layer 0 (llama.cpp reads the head size from it)"),
        (case_dir("gqa-heads"), no_ffn, "cannot export layer 2 with FFN width 0"),
    ]
    for i, (src, edit, message) in enumerate(cases):
        model_dir = _edited_copy(src, tmp_path / f"m{i}", edit)
        _assert_one_line_error(_export_cli(model_dir, tmp_path / "m.gguf"), message)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".m.gguf*"))


def test_a_failure_while_writing_leaves_no_file(models, tmp_path, monkeypatch):
    from streamprune import export_gguf as module

    calls = {"n": 0}
    real = module._convert

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 6:
            raise OSError(28, "No space left on device")
        return real(*args)

    monkeypatch.setattr(module, "_convert", failing)
    with pytest.raises(StreamPruneError, match="No space left on device"):
        export_gguf(models("llama-gqa"), tmp_path / "m.gguf", "f16")
    assert list(tmp_path.iterdir()) == []


def test_run_with_gguf_exports_right_after_pruning(models, calib_file, tmp_path):
    out, gguf_path = tmp_path / "out", tmp_path / "out.gguf"
    result = CliRunner().invoke(main, ["run", str(models("llama-gqa")), str(out), "--ratio", "0.2", "--calib",
                                       str(calib_file), "--nsamples", "4", "--seqlen", "16", "--quiet",
                                       "--gguf", str(gguf_path), "--gguf-outtype", "q8_0"])
    assert result.exit_code == 0, result.output
    assert f"-> {gguf_path}" in result.output and gguf_path.read_bytes()[:4] == b"GGUF"
