"""Layer-streamed evaluation against direct full-model computations."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from streamprune.cli import main
from streamprune.evaluation import EvalSettings, evaluate, final_hidden_states, text_windows
from tests.tiny_models import CALIB_TEXT

FLOAT32 = EvalSettings(dtype="float32")


def _direct_perplexity(model_dir, windows, **kwargs) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        logits = model(windows).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return math.exp(float(nll))


@pytest.fixture(scope="module")
def windows(models):
    tokenizer = AutoTokenizer.from_pretrained(models("llama-gqa"))
    return text_windows(CALIB_TEXT, tokenizer, 16)


def test_windows_are_consecutive_and_non_overlapping(models):
    tokenizer = AutoTokenizer.from_pretrained(models("llama-gqa"))
    ids = tokenizer(CALIB_TEXT)["input_ids"]
    w = text_windows(CALIB_TEXT, tokenizer, 16)
    assert w.shape == (len(ids) // 16, 16)
    assert w.flatten().tolist() == ids[: w.numel()]


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-gqa", "llama-tied", "qwen3-gqa"])
def test_streamed_perplexity_equals_full_model(models, windows, name):
    result = evaluate(models(name), windows, settings=EvalSettings(batch_size=3, dtype="float32"))
    assert result.tokens == windows.shape[0] * 15
    assert result.perplexity == pytest.approx(_direct_perplexity(models(name), windows), rel=1e-5)


def test_pruned_model_perplexity_kl_and_agreement(models, windows, pruned):
    dense = models("llama-gqa")
    out = pruned("llama-gqa", 0.3).out_dir
    pruned = evaluate(out, windows, reference_dir=dense, settings=FLOAT32)
    assert pruned.perplexity == pytest.approx(_direct_perplexity(out, windows, trust_remote_code=True), rel=1e-5)
    assert pruned.kl_from_reference > 1e-4 and 0 < pruned.top1_agreement < 1
    itself = evaluate(dense, windows, reference_dir=dense, settings=FLOAT32)
    assert abs(itself.kl_from_reference) < 1e-6 and itself.top1_agreement == 1.0
    # A cached reference (its final hidden states) gives the same figures as streaming it again.
    hidden = final_hidden_states(dense, windows, FLOAT32)
    cached = evaluate(out, windows, reference_dir=dense, reference_hidden=hidden, settings=FLOAT32)
    assert cached.kl_from_reference == pytest.approx(pruned.kl_from_reference, rel=1e-9)
    assert cached.top1_agreement == pruned.top1_agreement and cached.perplexity == pruned.perplexity


def test_eval_cli_json(models, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text(CALIB_TEXT)
    result = CliRunner().invoke(main, ["eval", str(models("llama-gqa")), "--text", str(text), "--seqlen", "16",
                                       "--json", "--quiet", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["perplexity"] > 1 and data["windows"] > 3


def test_eval_cli_needs_a_text(models):
    result = CliRunner().invoke(main, ["eval", str(models("llama-gqa"))])
    assert result.exit_code == 2 and "pass exactly one of --text FILE or --dataset NAME" in result.output


def test_reference_perplexity_is_the_references_own(models, windows, pruned):
    out = pruned("llama-gqa", 0.3).out_dir
    both = evaluate(out, windows, reference_dir=models("llama-gqa"))
    assert both.reference_perplexity == pytest.approx(evaluate(models("llama-gqa"), windows).perplexity, rel=1e-6)
    assert both.perplexity == pytest.approx(evaluate(out, windows).perplexity, rel=1e-6)
    assert evaluate(out, windows).reference_perplexity is None


HELD_OUT = (
    "The old lighthouse keeper climbed the spiral stairs every evening to light the lamp for passing ships. "
    "Rivers carry sediment from the mountains to the sea, building wide deltas over thousands of years. "
    "A compiler translates source code into machine instructions that the processor can execute directly. "
) * 4


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_default_recovery_brings_the_written_model_closer_to_dense(models, calib_file, tmp_path, ratio):
    """The written model, evaluated layer by layer against the dense one: the default least-squares recovery
    must leave a lower KL to dense than no recovery (--no-regression), on the calibration text and on text
    it never saw. This fails if the refit weights are not the ones written."""
    from streamprune import prune

    src = models("llama-gqa")
    tokenizer = AutoTokenizer.from_pretrained(src)
    options = {"calib": str(calib_file), "nsamples": 32, "seqlen": 16, "dtype": "float32", "quiet": True}
    kl = {}
    for name, extra in (("default", {}), ("no-regression", {"regression": False})):
        out = prune(src, tmp_path / name, ratio, **options, **extra).out_dir
        for text_name, text in (("calibration", CALIB_TEXT), ("held-out", HELD_OUT)):
            windows = text_windows(text, tokenizer, 16)
            result = evaluate(out, windows, reference_dir=src, settings=FLOAT32)
            kl[name, text_name] = result.kl_from_reference
    for text_name in ("calibration", "held-out"):
        assert 0 < kl["default", text_name] < kl["no-regression", text_name], (text_name, kl)
