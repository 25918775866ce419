"""The streaming engine against the literal float64 reference (tests/reference_slimllm.py).

Both prune the same tiny checkpoint on the same calibration ids with the same per-layer plans (the
engine's allocation is taken as given: the reference checks what each layer does with its plan).
They must keep the same heads and channels in every layer and write the same tensors. The cases run the
engine's default options (least-squares recovery included) unless they name others; the reference
takes the options the engine reports. The engine
computes in float32 from float64 statistics, so the tolerance is a float32 one, not a float64 one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import streamprune
from tests.reference_slimllm import (
    RefPlan,
    RefResult,
    RefSwitches,
    layer_cosines,
    reference_prune,
    rms_norm,
    rotary_tables,
)
from tests.tiny_models import make_tiny_model, write_calib_text

NSAMPLES, SEQLEN, SEED = 8, 16, 0
# float32 tolerance: the engine's hidden states and weights are float32, its statistics float64. Sliced
# tensors agree exactly; the regression-scaled o_proj / down_proj differ by at most ~1e-6 absolute. The
# largest relative error (~6e-5, on a_c) is in the last layer, where the allocation keeps 1-2 heads or a
# single channel: the kept part barely correlates with the dense output, a_c = cov/var spans -50..30,
# and float32 noise in the hidden states is amplified by that ill-conditioned ratio.
RTOL, ATOL = 1e-4, 1e-6
# The least-squares refit solves a |K| x |K| system whose conditioning amplifies that float32 noise (worst
# with fewer tokens than kept channels): up to ~4e-6 absolute on weights of magnitude ~0.1, so refitted
# o_proj / down_proj tensors get an absolute tolerance of 1e-5. Heads and channels must still match exactly.
LSTSQ_ATOL = 1e-5


@dataclass(frozen=True)
class Case:
    family: str
    heads: int
    kv_heads: int | None
    ratio: float
    options: dict = field(default_factory=dict)
    biases: bool = False  # Llama with attention_bias and mlp_bias: o_proj / down_proj already have a bias
    expect_swaps: bool = False  # the greedy search changes the kept set somewhere (seen with these seeds)
    calib: tuple[int, int] = (NSAMPLES, SEQLEN)  # (nsamples, seqlen)


# batch_size 3 splits the 8 samples 3 + 3 + 2, so the engine's running statistics span several batches.
CASES = {
    # expect_swaps marks the cases whose greedy search makes swaps with the test calibration ids
    # (checked so the search is really compared, not skipped); which ones do depends on the ids.
    "mha_llama": Case("llama", 8, None, 0.3, {"batch_size": 3}, expect_swaps=True),
    "gqa_llama_heads": Case("llama", 8, 2, 0.3, {"gqa_mode": "heads"}),
    "gqa_llama_groups": Case("llama", 8, 4, 0.3, {"gqa_mode": "groups", "batch_size": 3}),
    "qwen2_gqa_heads": Case("qwen2", 8, 2, 0.3, {"gqa_mode": "heads", "batch_size": 3}, expect_swaps=True),
    "mistral_gqa_groups": Case("mistral", 8, 2, 0.3, {"gqa_mode": "groups"}),
    "qwen3_gqa_heads": Case("qwen3", 8, 2, 0.3, {"gqa_mode": "heads", "batch_size": 3}),
    "llama_all_biases": Case("llama", 8, None, 0.3, biases=True, expect_swaps=True),
    # 2 x 16 = 32 tokens < hidden 64: the engine takes the PCA from the token Gram, the reference from
    # the C x C covariance, as docs/method.md "Channel scoring" defines it.
    "few_tokens_llama": Case("llama", 8, None, 0.3, calib=(2, 16)),
    # The paper's per-row a*y+b recovery (the cases above run the default least-squares refit).
    "affine_mha_llama": Case("llama", 8, None, 0.3, {"recovery": "affine", "batch_size": 3}, expect_swaps=True),
    "affine_gqa_qwen2_groups": Case("qwen2", 8, 2, 0.3, {"recovery": "affine", "gqa_mode": "groups"}),
    "affine_all_biases": Case("llama", 8, None, 0.3, {"recovery": "affine"}, biases=True, expect_swaps=True),
    "ablation_mha_llama": Case("llama", 8, None, 0.3, {"greedy": False, "feature_space": False,
                                                       "regression": False}),
}


@dataclass
class Run:
    """One engine run and the reference on the same inputs."""

    engine: dict[str, torch.Tensor]  # output tensors as written (float32)
    report: dict
    dense: dict[str, torch.Tensor]  # the input checkpoint
    ref: RefResult
    ref_scores: list[float]  # docs/method.md "Layer ratios": layer cosines of the dense model, from the reference
    case: Case


def _load_folder(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def _prune_recording_ids(src: Path, out: Path, case: Case, calib: Path):
    """Run the engine and capture the calibration ids it actually pruned on (whatever its loader does),
    so the reference sees exactly the same tokens."""
    from streamprune.engine import StreamingPruner

    seen: list[torch.Tensor] = []
    original = StreamingPruner._calibration_ids

    def recording(self: StreamingPruner) -> torch.Tensor:
        ids = original(self)
        seen.append(ids.clone())
        return ids

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StreamingPruner, "_calibration_ids", recording)
        nsamples, seqlen = case.calib
        result = streamprune.prune(src, out, case.ratio, calib=str(calib), nsamples=nsamples, seqlen=seqlen,
                                   seed=SEED, quiet=True, dtype="float32", device="cpu",
                                   **{"attention_scale": 1.0, **case.options})
    assert len(seen) == 1 and seen[0].shape == case.calib
    return result, seen[0]


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    return write_calib_text(tmp_path_factory.mktemp("calib") / "calib.txt")


def _add_biases(src: Path) -> None:
    """Rewrite a tiny Llama folder with attention_bias and mlp_bias (all q/k/v/o and gate/up/down biases),
    so the regression has to fold an existing bias into the new one. make_tiny_model has no such option."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM.from_pretrained(str(src))
    config = LlamaConfig.from_pretrained(str(src), attention_bias=True, mlp_bias=True)
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and all(n.endswith(".bias") for n in missing)
    torch.manual_seed(1)
    with torch.no_grad():
        for name in missing:
            model.get_parameter(name).normal_(0, 0.05)
    model.save_pretrained(src)


def _run_case(case: Case, root: Path, calib: Path) -> Run:
    src = make_tiny_model(root / "src", case.family, heads=case.heads, kv_heads=case.kv_heads)
    if case.biases:
        _add_biases(src)
    out = root / "out"
    result, ids = _prune_recording_ids(src, out, case, calib)
    plans = [RefPlan(p.prune_units_per_bucket, p.prune_channels) for p in result.allocation.plans]
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float64, attn_implementation="eager")
    ran = result.report["options"]  # what the engine ran: its defaults unless the case says otherwise
    switches = RefSwitches(**{k: ran[k] for k in ("greedy", "feature_space", "regression", "recovery", "damping")})
    ref = reference_prune(model, ids, plans, case.options.get("gqa_mode", "heads"), switches)
    dense = reference_prune(model, ids, [RefPlan(0, 0)] * len(plans))
    return Run(_load_folder(out), result.report, _load_folder(src), ref, layer_cosines(dense.hidden), case)


@pytest.fixture(scope="module", params=sorted(CASES))
def run(request, tmp_path_factory, calib_file) -> Run:
    return _run_case(CASES[request.param], tmp_path_factory.mktemp(request.param), calib_file)


def _engine_kept_channels(run: Run, layer: int) -> list[int]:
    """Channels the engine kept, recovered by matching its gate_proj rows to the dense ones (exact copies)."""
    name = f"model.layers.{layer}.mlp.gate_proj.weight"
    match = (run.engine[name][:, None, :] == run.dense[name][None, :, :]).all(-1)
    assert bool((match.sum(1) == 1).all()), "every written gate row must be one dense row"
    return match.float().argmax(1).tolist()


def max_abs_differences(run: Run) -> dict[str, float]:
    """Largest |engine - reference| per tensor kind (e.g. 'o_proj.weight') over all layers."""
    diffs: dict[str, float] = {}
    for name, ref in run.ref.tensors.items():
        kind = ".".join(name.split(".")[-2:])
        d = float((run.engine[name].double() - ref).abs().max()) if ref.numel() else 0.0
        diffs[kind] = max(diffs.get(kind, 0.0), d)
    return diffs


def test_the_case_prunes_something(run: Run) -> None:
    """Guard against a vacuous comparison: heads and channels must actually be removed."""
    layers = run.report["layers"]
    assert any(r["heads_kept"] < r["heads_total"] for r in layers)
    assert any(r["channels_kept"] < r["channels_total"] for r in layers)
    options = run.report["options"]
    if options["regression"] and options["recovery"] == "lstsq":  # the default refit really ran, in both
        assert any("mse_recovered" in r.get("down_proj_fit", {}) for r in layers)
        assert all(info.down_fit is None and info.o_fit is None for info in run.ref.layers)  # no affine fit
    if run.case.expect_swaps:
        assert any(r.get("greedy_swaps", 0) > 0 for r in layers)
        assert any(info.sim_final > info.sim_initial for info in run.ref.layers if info.sim_initial is not None)


def test_same_layer_scores(run: Run) -> None:
    """Pass 1 (dense) layer cosines, which drive the allocation the rest of the test takes as given."""
    got = [r["score"] for r in run.report["layers"]]
    assert got == pytest.approx(run.ref_scores, rel=1e-6)


def test_same_heads_kept(run: Run) -> None:
    for i, info in enumerate(run.ref.layers):
        assert run.report["layers"][i]["kept_heads"] == info.kept_heads, f"layer {i}"
        assert run.report["layers"][i]["kv_heads_kept"] == len(info.kept_kv_heads), f"layer {i}"


def test_same_channels_kept(run: Run) -> None:
    for i, info in enumerate(run.ref.layers):
        assert _engine_kept_channels(run, i) == info.kept_channels, f"layer {i}"


def test_same_similarity(run: Run) -> None:
    """The engine's closed-form sim(S) before and after the greedy search equals the literal one."""
    for i, info in enumerate(run.ref.layers):
        rep = run.report["layers"][i]
        if info.sim_initial is None:
            continue
        assert rep["similarity_initial"] == pytest.approx(info.sim_initial, rel=1e-5), f"layer {i}"
        assert rep["similarity_final"] == pytest.approx(info.sim_final, rel=1e-5), f"layer {i}"


def test_same_tensors(run: Run) -> None:
    layer_names = {n for n in run.engine if n.startswith("model.layers.")}
    assert layer_names == set(run.ref.tensors)
    for name, ref in run.ref.tensors.items():
        got = run.engine[name]
        assert got.dtype == torch.float32, name
        refitted = run.report["options"]["recovery"] == "lstsq" and (".o_proj." in name or ".down_proj." in name)
        atol = LSTSQ_ATOL if refitted else ATOL
        torch.testing.assert_close(got.double(), ref, rtol=RTOL, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def test_reference_dense_forward_matches_transformers(tmp_path: Path) -> None:
    """With empty plans the reference is a dense forward: its hand-written attention must reproduce
    transformers' hidden states, or agreement with the engine would prove nothing.

    transformers rounds RMSNorm and the rotary tables through float32; with those two swapped for the
    reference's float64 versions, the rest of its float64 forward (sdpa attention) must agree to 1e-10.
    """
    for family, kv in (("llama", None), ("qwen2", 2), ("qwen3", 2)):
        src = make_tiny_model(tmp_path / family, family, kv_heads=kv)
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float64, attn_implementation="sdpa")
        ids = torch.randint(0, model.config.vocab_size, (NSAMPLES, SEQLEN), generator=torch.Generator().manual_seed(0))
        ref = reference_prune(model, ids, [RefPlan(0, 0)] * model.config.num_hidden_layers)
        inner = model.model
        for module in inner.modules():
            if module.__class__.__name__.endswith("RMSNorm"):
                module.forward = functools.partial(rms_norm, module)
        rope = inner.rotary_emb
        rope.forward = lambda x, position_ids, rope=rope: rotary_tables(rope, position_ids.shape[-1])
        with torch.no_grad():
            hf = model(ids, output_hidden_states=True).hidden_states
        for layer in range(1, model.config.num_hidden_layers):  # the last entry has the final norm applied
            torch.testing.assert_close(ref.hidden[layer], hf[layer], rtol=1e-10, atol=1e-10)
        assert all(torch.equal(ref.tensors[n], t.double()) for n, t in _load_folder(src).items() if n in ref.tensors)
