"""`streamprune demo` on tiny models (the real SmolLM2 is measured for the README, never in tests)."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from click.testing import CliRunner

from streamprune import demo
from streamprune.calibration import BUILTIN_TEXT, load_calibration
from streamprune.cli import main
from streamprune.demo.checks import DEMO_CHOICES, load_choice_items
from streamprune.loading import load_pruned
from tests.tokenizer_fixtures import make_tiny_tokenizer

FAST = ["--nsamples", "4", "--seqlen", "16", "--eval-windows", "6", "--max-new-tokens", "8"]
DATA = BUILTIN_TEXT.parent


def _demo(model_dir, cache_dir, *extra, **kwargs):
    return CliRunner().invoke(main, ["demo", "--model-dir", str(model_dir), "--cache-dir", str(cache_dir), *FAST,
                                     *extra], **kwargs)


def _row(output: str, label: str) -> list[str]:
    """The cells after `label` in the result table (split on runs of 2+ spaces)."""
    line = next(line for line in output.splitlines() if line.startswith(label))
    return re.split(r"\s{2,}", line[len(label):].strip())


@pytest.fixture(scope="module")
def tied_demo(models, tmp_path_factory):
    """One demo run on the tied-embedding tiny model, shared by the checks below."""
    cache = tmp_path_factory.mktemp("demo-cache")
    result = _demo(models("llama-tied"), cache)
    assert result.exit_code == 0, result.output
    return result, cache


def test_demo_table_compares_every_measure(tied_demo, models):
    result, cache = tied_demo
    out = result.output
    for label in ("weights on disk", "perplexity (", "KL(dense || pruned) per token", "top-1 agreement with dense",
                  "multiple choice", "generation tokens/s"):
        assert any(line.startswith(label) for line in out.splitlines()), label
    dense_ppl, pruned_ppl = re.search(r"^perplexity \([\d,]+ tokens\)\s+(\S+)\s+(\S+)", out, flags=re.M).groups()
    assert float(dense_ppl) > 1 and float(pruned_ppl) > 1
    right = _row(out, "multiple choice")
    n_items = len(load_choice_items())
    assert all(re.fullmatch(rf"\d+/{n_items}", cell) for cell in right)
    speeds = _row(out, "generation tokens/s")
    assert float(speeds[0]) > 0 and float(speeds[1]) > 0
    assert "  dense : '" in out and "  pruned: '" in out  # one sampled completion each


def test_demo_counts_a_tied_weight_once_and_reports_file_sizes(tied_demo, models):
    result, cache = tied_demo
    dense_dir = models("llama-tied")
    out_dir = cache / "demo" / "llama-tied-pruned-20"
    dense, pruned = (int(c.replace(",", "")) for c in _row(result.output, "parameters")[:2])
    assert dense == load_pruned(dense_dir).num_parameters()  # transformers counts the tied head once
    assert pruned == load_pruned(out_dir).num_parameters()
    assert 0.19 < 1 - pruned / dense < 0.21
    sizes = _row(result.output, "weights on disk")
    on_disk = sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))
    assert sizes[1] == f"{on_disk / 1e6:,.1f} MB"


def test_demo_states_every_step_time_and_writes_the_figure(tied_demo):
    result, cache = tied_demo
    times = dict(re.findall(r"^  (.+?)\s+(\d+\.\d) s$", result.output, flags=re.M))
    for step in ("start-up (imports)", "calibration", "pass 1 (dense scores)", "pass 2 (prune)",
                 "evaluation (both models)", "multiple choice (both)", "generation (both)",
                 "total, from the command to this table"):
        assert step in times, step
    parts = sum(float(v) for k, v in times.items() if not k.startswith("total"))
    assert abs(float(times["total, from the command to this table"]) - parts) < 0.5 + 0.05 * parts
    figure = re.search(r"^figure: (.+)$", result.output, flags=re.M).group(1)
    png = open(figure, "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_demo_shows_progress_for_the_long_steps(models, tmp_path):
    result = _demo(models("llama-gqa"), tmp_path)
    assert result.exit_code == 0, result.output
    for bar in ("pass 1/2 (dense scores)", "pass 2/2 (prune)", "evaluation:", "dense multiple choice:",
                "pruned 20% generation:"):
        assert bar in result.stderr, bar
    quiet = _demo(models("llama-gqa"), tmp_path / "q", "--quiet")
    assert quiet.exit_code == 0 and "pass 1/2" not in quiet.stderr and "-- evaluation" in quiet.output


def test_demo_self_calibration_shows_its_progress(models, tmp_path):
    result = _demo(models("llama-gqa"), tmp_path, "--calib", "self")
    assert result.exit_code == 0, result.output
    assert "calibration (sampling from the model)" in result.stderr
    assert "self-generated samples" in result.output


def test_demo_without_the_demo_extra_names_it(models, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    result = _demo(models("llama-gqa"), tmp_path)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == ("error: streamprune demo (its figure) needs matplotlib, which is not installed: "
                             "pip install 'streamprune[demo]'\n")
    assert not (tmp_path / "demo").exists()  # failed before any work


def test_demo_options_share_the_run_schema_ranges(tmp_path):
    for args, message in ((["--nsamples", "0"], "--nsamples must be at least 1, got 0"),
                          (["--seqlen", "1"], "--seqlen must be at least 2, got 1")):
        result = CliRunner().invoke(main, ["demo", "--cache-dir", str(tmp_path), *args])
        assert result.exit_code == 2 and result.stderr == f"error: {message}\n"
    assert not any(tmp_path.iterdir())  # refused before any download or conversion
    run_help = {p.name: p.help for p in main.commands["run"].params}
    demo_help = {p.name: p.help for p in main.commands["demo"].params}
    assert all(demo_help[name] == run_help[name] for name in ("calib", "nsamples", "seqlen", "device"))


def test_demo_accepts_a_hub_repo_id(hub_cache, tmp_path):
    result = _demo(hub_cache.repo_id, tmp_path, "--quiet")
    assert result.exit_code == 0, result.output
    assert f"pruned model: {tmp_path / 'demo' / 'tiny-llama-pruned-20'}" in result.output


# --------------------------------------------------------------------------------------- shipped data


def test_shipped_texts_are_distinct_sized_and_documented():
    calibration = BUILTIN_TEXT.read_text(encoding="utf-8")
    evaluation = demo.DEMO_EVAL_TEXT.read_text(encoding="utf-8")
    assert BUILTIN_TEXT.stat().st_size < 300_000 and demo.DEMO_EVAL_TEXT.stat().st_size < 300_000
    # English prose runs 1.3+ tokens per word in LLaMA-family tokenizers: 19k words are 25k SmolLM2 tokens.
    assert len(evaluation.split()) >= 16_000
    paragraphs = {p for p in evaluation.split("\n\n") if len(p) > 80}
    assert paragraphs and not any(p in calibration for p in paragraphs)
    assert "gutenberg" not in (calibration + evaluation).lower()  # no trademark use in the copies
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    for needle in ("public domain", "14881", "18304", "17474", "20170", "52834", "demo_choices.jsonl"):
        assert needle in readme.lower() or needle in readme


def test_builtin_calibration_source(tmp_path):
    tok = make_tiny_tokenizer(320)
    ids = load_calibration("builtin", tok, nsamples=8, seqlen=64, seed=0)
    assert ids.shape == (8, 64) and int(ids.max()) < 320


def test_shipped_choice_items_are_well_formed():
    items = load_choice_items(DEMO_CHOICES)
    assert len(items) >= 20
    assert all(len(i.choices) == 4 and all(c.startswith(" ") for c in i.choices) for i in items)
    assert len({i.answer for i in items}) > 1  # the right answer is not always in the same place


def test_demo_defaults_are_the_fast_builtin_setup():
    params = {p.name: p.default for p in main.commands["demo"].params}
    assert params["calib"] == "builtin" and params["device"] == "auto"
    assert params["nsamples"] * params["seqlen"] >= 1536 * 2  # the refit needs more tokens than channels


def test_demo_api_returns_the_numbers(models, tmp_path):
    settings = demo.DemoSettings(nsamples=4, seqlen=16, eval_windows=4, max_new_tokens=4, quiet=True)
    result = demo.run_demo(models("llama-gqa"), tmp_path, settings, echo=lambda line: None)
    assert result.dense.kl is None and result.pruned.kl >= 0 and 0 <= result.pruned.agreement <= 1
    assert result.pruned.params < result.dense.params and result.pruned.file_bytes < result.dense.file_bytes
    assert "start-up" not in result.steps and result.steps["total"] > 0
    assert torch.isfinite(torch.tensor(result.pruned.perplexity))
