"""Gradient reconstruction of pruned windows (streamprune/reconstruction.py, LayerJob._reconstruct)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import streamprune
from streamprune import engine
from streamprune.allocation import LayerPlan
from streamprune.errors import StreamPruneError
from streamprune.reconstruction import (
    GradientReconstruction,
    ReconstructionSettings,
    WindowSizes,
    WindowTrainer,
    bytes_per_trained_param,
    dimension_weights,
    reconstruction_memory,
    split_rows,
)
from streamprune.report import report_table
from tests.conftest import CALIB
from tests.helpers import FAST, assert_killed_run_resumes_to_a_clean_runs_bytes, output_digest, run_cli_process

# Enough sequences for a held-out set, and a learning rate suited to tiny random weights (std 0.02).
RECON = {**CALIB, "nsamples": 20, "seqlen": 16, "reconstruct_lr": 3e-4, "reconstruct_epochs": 6}
IDS = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 40, 2, 11]])


def _settings(**kw) -> ReconstructionSettings:
    base = {"windows": ("mlp",), "inputs": "pruned", "epochs": 20, "lr": 1e-2, "batch": 4, "val_every": 5,
            "seed": 0}
    return ReconstructionSettings(**{**base, **kw})


def _shards(out) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def _windows(report: dict) -> list[dict]:
    return [w for layer in report["layers"] for w in layer.get("reconstruction") or []]


# -- the trainer on a problem with a known answer ----------------------------------------------------


def _linear_problem(n=40, t=6, c=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, c, generator=gen)
    true = torch.randn(c, c, generator=gen) / c**0.5
    y = x @ true.T
    start = torch.nn.Parameter(true + 0.3 * torch.randn(c, c, generator=gen))
    return x, y, start


def test_split_rows_hold_out_every_nth_sequence():
    train, val = split_rows(20, 5)
    assert val.tolist() == [4, 9, 14, 19] and len(train) == 16
    assert set(train.tolist()) | set(val.tolist()) == set(range(20))
    assert [r.tolist() for r in split_rows(3, 0)] == [[0, 1, 2], [0, 1, 2]]  # no hold-out: training decides
    assert split_rows(3, 5)[1].tolist() == [2]  # fewer sequences than N still validate on one


def test_dimension_weights_are_the_inverse_mean_square_of_the_dense_stream_after_the_window():
    gen = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(10, 6, 4, generator=gen), torch.randn(10, 6, 4, generator=gen)
    inputs[..., 0] *= 50  # a massive-activation dimension weighs as much as the others once weighted
    rows = torch.tensor([0, 3, 4, 9])
    stream = (inputs[rows].double() + targets[rows].double()).reshape(-1, 4)
    expected = 1 / stream.square().mean(0)
    assert torch.allclose(dimension_weights(inputs, targets, rows).double(), expected, rtol=1e-6)


def test_trainer_lowers_training_and_held_out_error_and_keeps_the_best_epoch():
    x, y, w = _linear_problem()
    trainer = WindowTrainer([w], lambda v: v @ w.T, _settings(), torch.device("cpu"), seed=1)
    report = trainer.run("mlp", x, y)
    assert report.kept and report.best_epoch > 0
    assert report.val_after < 0.2 * report.val_before and report.train_after < 0.2 * report.train_before
    assert report.steps == 20 * 8  # 32 training sequences in batches of 4, 20 epochs
    # The reported held-out error is the weights' own.
    check = WindowTrainer([w], lambda v: v @ w.T, _settings(epochs=0), torch.device("cpu"), seed=1).run("mlp", x, y)
    assert check.val_before == pytest.approx(report.val_after, rel=1e-6)


@pytest.mark.parametrize("change", [{"epochs": 0}, {"lr": 0.0}])
def test_no_steps_leaves_the_weights_untouched(change):
    x, y, w = _linear_problem()
    before = w.detach().clone()
    report = WindowTrainer([w], lambda v: v @ w.T, _settings(**change), torch.device("cpu"), 1).run("mlp", x, y)
    assert not report.kept and report.steps == 0 and torch.equal(w, before)
    assert report.val_after == report.val_before


def test_a_non_finite_loss_stops_training_and_keeps_the_closed_form():
    x, y, w = _linear_problem()
    y[3, 2, 1] = float("inf")  # a sequence that overflows: the first step that sees it stops the training
    report = WindowTrainer([w], lambda v: v @ w.T, _settings(val_every=0), torch.device("cpu"), 1).run("mlp", x, y)
    assert report.non_finite and not report.kept and report.best_epoch == 0
    assert report.steps < 20 * 10  # stopped early


def test_rmsprop_lowers_the_error_too():
    x, y, w = _linear_problem()
    report = WindowTrainer([w], lambda v: v @ w.T, _settings(optimizer="rmsprop"), torch.device("cpu"), 1).run(
        "mlp", x, y)
    assert report.kept and report.val_after < 0.2 * report.val_before


def test_an_anchor_keeps_the_weights_nearer_the_closed_form():
    """theta -= lr_t * anchor * (theta - theta_0) after each step: a larger anchor, a smaller move; an anchor
    that pulls all the way back (lr * anchor >= 1) leaves the closed form exactly."""
    moves = {}
    for anchor in (0.0, 20.0, 1e9):
        x, y, w = _linear_problem()
        start = w.detach().clone()
        report = WindowTrainer([w], lambda v, w=w: v @ w.T, _settings(anchor=anchor, val_every=0),
                               torch.device("cpu"), 1).run("mlp", x, y)
        moves[anchor] = (float((w.detach() - start).norm()), report)
    assert 0 < moves[20.0][0] < 0.9 * moves[0.0][0]
    assert moves[20.0][1].train_after < moves[20.0][1].train_before  # still learns
    assert moves[1e9][0] == 0.0 and not moves[1e9][1].kept


def test_optimiser_state_and_anchor_are_counted_per_trained_parameter():
    assert bytes_per_trained_param(_settings()) == 16  # weight, gradient, two moments (float32)
    assert bytes_per_trained_param(_settings(optimizer="rmsprop")) == 12
    assert bytes_per_trained_param(_settings(anchor=1.0)) == 20  # plus the closed form's copy
    sizes = _70b(0.8)
    adam = reconstruction_memory(sizes, _settings(inputs="dense", batch=8), 128, 128, 2)
    rms = reconstruction_memory(sizes, _settings(inputs="dense", batch=8, optimizer="rmsprop"), 128, 128, 2)
    kept_mlp = 3 * 8192 * int(28672 * 0.8) + 8192
    assert adam.device_bytes - rms.device_bytes == 4 * kept_mlp


def test_training_is_deterministic_for_a_seed():
    results = []
    for _ in range(2):
        x, y, w = _linear_problem()
        WindowTrainer([w], lambda v, w=w: v @ w.T, _settings(epochs=3), torch.device("cpu"), 7).run("mlp", x, y)
        results.append(w.detach().clone())
    assert torch.equal(*results)


# -- the engine --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def closed_and_reconstructed(models, calib_file, tmp_path_factory):
    """llama-gqa at 40 % (heads and channels pruned) with the closed form, and with both windows."""
    root = tmp_path_factory.mktemp("recon")
    src = models("llama-gqa")
    common = {"calib": str(calib_file), **RECON}
    closed = streamprune.prune(src, root / "closed", 0.4, **common)
    recon = streamprune.prune(src, root / "recon", 0.4, reconstruct="both", **common)
    return src, closed, recon


@pytest.mark.parametrize("change", [{"reconstruct_epochs": 0}, {"reconstruct_lr": 0.0},
                                    {"reconstruct_anchor": 1e9}])  # pulled all the way back after every step
def test_zero_steps_or_zero_learning_rate_gives_the_closed_form_bytes(closed_and_reconstructed, tmp_path, change):
    src, closed, _ = closed_and_reconstructed
    out = streamprune.prune(src, tmp_path / "out", 0.4, calib=closed.report["options"]["calib"],
                            **{**RECON, "reconstruct": "both", **change}).out_dir
    assert output_digest(out) == output_digest(closed.out_dir)


def test_the_optimiser_option_reaches_the_trainer(closed_and_reconstructed, tmp_path):
    src, closed, recon = closed_and_reconstructed
    out = streamprune.prune(src, tmp_path / "out", 0.4, calib=closed.report["options"]["calib"],
                            **{**RECON, "reconstruct": "both", "reconstruct_optimizer": "rmsprop"})
    assert out.report["options"]["reconstruct_optimizer"] == "rmsprop"
    assert output_digest(out.out_dir) not in (output_digest(closed.out_dir), output_digest(recon.out_dir))
    assert any(w["kept"] for w in _windows(out.report))


def test_reconstruction_lowers_the_held_out_error_and_changes_only_kept_weights(closed_and_reconstructed):
    src, closed, recon = closed_and_reconstructed
    windows = _windows(recon.report)
    assert {w["window"] for w in windows} == {"attention", "mlp"}
    kept = [w for w in windows if w["kept"]]
    assert kept, "no window beat the closed form on the held-out sequences"
    for w in kept:
        assert w["val_after"] < w["val_before"] and w["best_epoch"] > 0
    for w in windows:
        if not w["kept"]:
            assert w["val_after"] == w["val_before"] and w["best_epoch"] == 0
    # The same tensors with the same shapes: only kept weights were trained; the parameter count holds.
    a, b = _shards(closed.out_dir), _shards(recon.out_dir)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert recon.report["params_after"] == closed.report["params_after"]
    assert recon.layer_specs == closed.layer_specs
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    # Up to the first kept window the closed form is the same; there, exactly the window's tensors moved (later
    # layers see another stream, so their closed form differs too).
    first = next(layer for layer in recon.report["layers"] if any(w["kept"] for w in layer["reconstruction"] or []))
    window = next(w for w in first["reconstruction"] if w["kept"])
    parts = ("self_attn.", "input_layernorm.") if window["window"] == "attention" else ("mlp.", "post_attention")
    prefix = f"model.layers.{first['layer']}."
    earlier = {k for k in changed if k.startswith("model.layers.") and int(k.split(".")[2]) < first["layer"]}
    assert not earlier
    moved = {k.removeprefix(prefix) for k in changed if k.startswith(prefix)}
    assert {k for k in moved if k.startswith(parts)}  # the window's own weights were trained
    if window["window"] == "mlp":  # the attention before it kept its closed form
        assert all(k.startswith(parts) for k in moved)
    assert not any(k.startswith(("model.embed", "lm_head", "model.norm")) for k in changed)


def test_reconstructed_model_loads_in_transformers_and_in_streamprunes_loader(closed_and_reconstructed):
    _, closed, recon = closed_and_reconstructed
    remote = AutoModelForCausalLM.from_pretrained(recon.out_dir, trust_remote_code=True)
    own = streamprune.load_pruned(recon.out_dir)
    logits = remote(IDS).logits
    torch.testing.assert_close(own(IDS).logits, logits, rtol=0, atol=0)
    assert torch.isfinite(logits).all()
    n_params = sum(p.numel() for p in remote.parameters())
    assert n_params == recon.report["params_after"]


def test_reconstructed_model_exports_to_gguf(closed_and_reconstructed, tmp_path):
    pytest.importorskip("gguf")
    from gguf import GGUFReader

    from streamprune.export_gguf import export_gguf

    _, _, recon = closed_and_reconstructed
    path = export_gguf(recon.out_dir, tmp_path / "model.gguf", "f32").path
    names = {t.name for t in GGUFReader(path).tensors}
    assert "blk.0.ffn_down.weight" in names and "token_embd.weight" in names


def test_report_and_table_show_each_window(closed_and_reconstructed):
    _, _, recon = closed_and_reconstructed
    saved = json.loads((recon.out_dir / "streamprune_report.json").read_text())
    assert _windows(saved) == _windows(recon.report)
    table = report_table(saved)
    assert "recon attn" in table and "recon mlp" in table
    kept = next(w for w in _windows(saved) if w["kept"])
    assert f"{kept['val_before']:.3g}>{kept['val_after']:.3g}" in table


def test_two_runs_give_identical_bytes(closed_and_reconstructed, tmp_path):
    src, closed, recon = closed_and_reconstructed
    again = streamprune.prune(src, tmp_path / "again", 0.4, calib=closed.report["options"]["calib"],
                              reconstruct="both", **RECON)
    assert output_digest(again.out_dir) == output_digest(recon.out_dir)


@pytest.mark.parametrize(("window", "inputs", "target"),
                         [("both", "pruned", "pruned"), ("both", "pruned", "dense"), ("layer", "dense", "pruned"),
                          ("layer", "pruned", "pruned")])
def test_other_windows_and_inputs_run_and_load(models, calib_file, tmp_path, window, inputs, target):
    src = models("qwen2-gqa")  # q/k/v biases are trained too
    result = streamprune.prune(src, tmp_path / "out", 0.4, calib=str(calib_file), reconstruct=window,
                               reconstruct_inputs=inputs, target=target, **RECON)
    windows = _windows(result.report)
    assert windows and {w["window"] for w in windows} == ({"layer"} if window == "layer" else {"attention", "mlp"})
    for w in windows:
        assert w["val_after"] < w["val_before"] if w["kept"] else w["val_after"] == w["val_before"]
    model = AutoModelForCausalLM.from_pretrained(result.out_dir, trust_remote_code=True)
    assert torch.isfinite(model(IDS).logits).all()


# -- memory -------------------------------------------------------------------------------------------------


def _70b(kept_fraction: float) -> WindowSizes:
    c, f = 8192, 28672
    return WindowSizes(hidden=c, heads=64, kv_heads=8, head_dim=128, intermediate=int(f * kept_fraction),
                       dense_mlp_params=3 * c * f)


def test_a_window_runs_where_its_submodule_is_pruned_and_a_layer_window_wherever_anything_is():
    """The engine's memory estimate asks the part for its windows, so both follow this one rule."""
    part = GradientReconstruction(_settings(windows=("attention", "mlp", "layer")))
    plan = lambda units, channels: LayerPlan(0, 0.5, 1.0, 0.2, units, channels)  # noqa: E731
    assert part.windows(plan(1, 0)) == ("attention", "layer")
    assert part.windows(plan(0, 8)) == ("mlp", "layer")
    assert part.windows(plan(1, 8)) == ("attention", "mlp", "layer")
    assert part.windows(plan(0, 0)) == ()


def test_memory_accounting_of_the_70b_shape_fits_a_16_gb_gpu():
    """LLaMA-2-70B shape, 128 x 128 calibration, fp16 compute, default reconstruction settings (both windows,
    dense inputs, 8 sequences a step), the FFN keeping 80 % of its channels."""
    sizes = _70b(0.8)
    settings = _settings(windows=("attention", "mlp"), inputs="dense", batch=8)
    memory = reconstruction_memory(sizes, settings, 128, 128, compute_bytes=2)
    kept_mlp = 3 * 8192 * int(28672 * 0.8) + 8192
    assert memory.window == "mlp"
    assert memory.parts["weights+grads+optimiser"] == 16 * kept_mlp  # float32 weight, gradient, Adam's 2 moments
    assert memory.parts["streams"] == 6 * 128 * 128 * 8192 * 4
    assert memory.host_bytes == 4 * kept_mlp  # the best epoch's weights wait on the host
    assert memory.device_bytes == sum(memory.parts.values())
    assert 12 * 2**30 < memory.device_bytes < 15 * 2**30  # leaves room for CUDA's own context on 16 GB
    # Attention window: its weights, the streams, and the dense FFN still resident in fp16.
    attention = reconstruction_memory(sizes, _settings(windows=("attention",), inputs="dense", batch=8), 128, 128, 2)
    assert attention.parts["dense FFN"] == 2 * 3 * 8192 * 28672


def test_a_reconstruction_that_would_not_fit_is_refused_in_one_line_before_pass_2(models, calib_file, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setattr(engine, "free_memory_bytes", lambda device: 1 << 20)
    out = tmp_path / "out"
    with pytest.raises(StreamPruneError) as exc:
        streamprune.prune(models("llama-gqa"), out, 0.4, calib=str(calib_file), reconstruct="mlp", **RECON)
    message = str(exc.value)
    assert "\n" not in message and "--reconstruct needs about" in message
    assert "mlp window" in message and "GiB is free" in message and not out.exists()


def test_cli_refuses_unknown_reconstruct_choice(models, tmp_path):
    args = [str(models("llama-gqa")), str(tmp_path / "o"), "--ratio", "0.2", "--reconstruct", "all", *FAST]
    result = run_cli_process(args)
    assert result.returncode != 0 and "Traceback" not in result.stderr and "--reconstruct" in result.stderr


@pytest.mark.slow
def test_killed_in_the_middle_of_a_reconstruction_resumes_to_identical_bytes(models, calib_file, tmp_path):
    args = ["--ratio", "0.4", "--calib", str(calib_file), "--reconstruct", "both", "--reconstruct-lr", "3e-4",
            "--reconstruct-epochs", "3", "--attention-scale", "1", "--nsamples", "10", "--seqlen", "16",
            "--quiet", "--dtype", "float32"]
    assert_killed_run_resumes_to_a_clean_runs_bytes(str(models("llama-sharded")), args, "reconstruct:2", tmp_path)
