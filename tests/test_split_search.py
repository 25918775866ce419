"""`--split search`: each layer's head/channel split chosen by pruning it every candidate way."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import streamprune
from streamprune import layer_pruning
from streamprune.allocation import LayerPlan
from streamprune.split_search import SplitTrials, split_trial_rows, standardized_error
from tests.conftest import CALIB
from tests.helpers import FAST, assert_killed_run_resumes_to_a_clean_runs_bytes


def test_standardized_error_weights_each_dimension_by_its_dense_mean_square():
    torch.manual_seed(0)
    reference = torch.randn(4, 6, 5, dtype=torch.float32)
    reference[..., 0] *= 100.0  # a massive-activation dimension
    output = reference + 0.1 * torch.randn_like(reference)
    batches = [slice(0, 3), slice(3, 4)]
    flat_ref, flat_out = reference.double().reshape(-1, 5), output.double().reshape(-1, 5)
    expected = ((flat_out - flat_ref).pow(2).mean(0) / flat_ref.pow(2).mean(0)).sum()
    assert standardized_error(output, reference, batches) == pytest.approx(float(expected), rel=1e-12)
    # The same relative error in the massive dimension and in an ordinary one weighs the same.
    in_massive, in_ordinary = reference.clone(), reference.clone()
    in_massive[..., 0] *= 1.01
    in_ordinary[..., 1] *= 1.01
    assert standardized_error(in_massive, reference, batches) == pytest.approx(
        standardized_error(in_ordinary, reference, batches), rel=1e-5)  # float32 rounding of x * 1.01


def test_trials_keep_the_candidate_nearest_the_reference():
    reference = torch.ones(2, 3, 4)
    candidates = [LayerPlan(1, 0.9, 1.0, 0.5, u, 10 - 3 * u) for u in range(3)]
    offsets = {0: 0.5, 1: 0.1, 2: 0.3}  # candidate 1 lands nearest the reference
    tried = SplitTrials(reference, [slice(0, 1), slice(1, 2)])
    for plan in candidates:
        tried.add(plan, reference + offsets[plan.prune_units_per_bucket], f"result-{plan.prune_units_per_bucket}")
    assert tried.best.result == "result-1" and tried.best.plan is candidates[1]
    assert torch.allclose(tried.best.states, reference + 0.1)
    assert [(t.prune_units_per_bucket, t.prune_channels) for t in tried.trials] == [(0, 10), (1, 7), (2, 4)]
    assert [round(t.error, 6) for t in tried.trials] == [round(4 * o**2, 6) for o in (0.5, 0.1, 0.3)]


def test_trials_keep_the_earlier_of_two_equal_candidates():
    reference = torch.ones(1, 2, 3)
    tried = SplitTrials(reference, [slice(0, 1)])
    for u in range(2):
        tried.add(LayerPlan(0, 0.9, 1.0, 0.5, u, 4), reference + 0.2, u)
    assert tried.best.result == 0


def test_engine_keeps_the_split_with_the_least_error_in_every_layer(models, calib_file, tmp_path):
    out = tmp_path / "out"
    report = streamprune.prune(models("llama-gqa"), out, 0.4, calib=str(calib_file), split="search",
                               **CALIB).report
    assert report["options"]["split"] == "search" and abs(report["achieved_ratio"] - 0.4) <= 0.005
    searched = [layer for layer in report["layers"] if "split_trials" in layer]
    assert searched
    for layer in searched:
        trials = layer["split_trials"]
        assert len({t["prune_units_per_bucket"] for t in trials}) == len(trials) >= 2
        best = min(trials, key=lambda t: t["error"])
        heads_per_group = layer["heads_total"] // layer["kv_heads_kept"]
        assert layer["heads_kept"] == layer["heads_total"] - best["prune_units_per_bucket"] * layer["kv_heads_kept"]
        assert layer["channels_kept"] == layer["channels_total"] - best["prune_channels"]
        assert 0 <= best["prune_units_per_bucket"] < heads_per_group
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]
    assert torch.isfinite(model(torch.tensor([[1, 40, 41, 42]])).logits).all()


def test_split_trial_rows_are_evenly_spaced_or_all():
    assert split_trial_rows(8, 0) is None and split_trial_rows(8, 8) is None and split_trial_rows(8, 20) is None
    assert split_trial_rows(8, 3).tolist() == [0, 2, 5]
    assert split_trial_rows(128, 32).tolist() == list(range(0, 128, 4))


def test_split_samples_tries_candidates_on_a_subset_then_prunes_on_all(models, calib_file, tmp_path, monkeypatch):
    seen = []  # calibration sequences handed to each layer prune, in order
    real_run = layer_pruning.LayerJob.run

    def recording_run(job):
        plan = job.plan
        seen.append((plan.layer, job.hidden.shape[0], plan.prune_units_per_bucket, plan.prune_channels))
        return real_run(job)

    monkeypatch.setattr(layer_pruning.LayerJob, "run", recording_run)
    report = streamprune.prune(models("llama-gqa"), tmp_path / "out", 0.4, calib=str(calib_file), split="search",
                               split_samples=3, **CALIB).report
    assert report["options"]["split_samples"] == 3
    assert any("split_trials" in layer for layer in report["layers"])  # the subset path really ran
    for layer in report["layers"]:
        calls = [c for c in seen if c[0] == layer["layer"]]
        if "split_trials" not in layer:
            assert [c[1] for c in calls] == [8]  # nothing to choose: one prune on all sequences
            continue
        trials = layer["split_trials"]
        assert [c[1] for c in calls] == [3] * len(trials) + [8]  # trials on the subset, then all sequences
        best = min(trials, key=lambda t: t["error"])
        assert calls[-1][2:] == (best["prune_units_per_bucket"], best["prune_channels"])
        assert layer["channels_kept"] == layer["channels_total"] - best["prune_channels"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]


def test_fixed_split_layers_record_no_trials(pruned):
    report = pruned("llama-gqa", 0.3).report
    assert report["options"]["split"] == "fixed"
    assert not any("split_trials" in layer for layer in report["layers"])


@pytest.mark.slow
@pytest.mark.parametrize("subset", [[], ["--split-samples", "3"]], ids=["all-sequences", "subset"])
def test_split_search_killed_mid_run_resumes_to_the_same_output(models, calib_file, tmp_path, subset):
    args = ["--ratio", "0.4", "--calib", str(calib_file), "--split", "search", *subset, *FAST]
    assert_killed_run_resumes_to_a_clean_runs_bytes(str(models("llama-sharded")), args, "pass2:2", tmp_path)
