"""The options schema: one declaration drives the CLI, batch manifests and the API."""

from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner

from streamprune import cli, options
from streamprune.batch import manifest
from streamprune.errors import StreamPruneError
from streamprune.options import PAPER_METHOD, PruneOptions, check_value, cli_flag


def _run_params() -> dict:
    return {p.name: p for p in cli.run.params}


def test_every_field_is_a_run_option_with_the_schema_default():
    params = _run_params()
    for f in options.fields():
        param = params[f.name]
        assert cli_flag(f) in param.opts
        if f.default is not dataclasses.MISSING:
            assert param.default == f.default, f.name
    assert params["ratio"].required


def test_choices_come_from_the_schema():
    params = _run_params()
    assert list(params["recovery"].type.choices) == ["lstsq", "affine"]
    assert list(params["gqa_mode"].type.choices) == ["heads", "groups"]


def test_negated_flags_turn_the_option_off():
    params = _run_params()
    assert "--no-greedy" in params["greedy"].opts and params["greedy"].flag_value is False
    assert "--layers" in params["num_pruned_layers"].opts


@pytest.mark.parametrize(("changes", "message"), [
    ({"ratio": 1.0}, "--ratio must be at least 0 and below 1, got 1.0"),
    ({"nsamples": 0}, "--nsamples must be at least 1, got 0"),
    ({"damping": 0.0}, "--damping must be above 0, got 0.0"),
    ({"recovery": "svd"}, "--recovery must be one of lstsq, affine, got 'svd'"),
    ({"num_pruned_layers": 0}, "--layers must be at least 1, got 0"),
    ({"attention_scale": -1.0}, "--attention-scale must be at least 0, got -1.0"),
    ({"split_samples": -1, "split": "search"}, "--split-samples must be at least 0, got -1"),
    ({"channel_multiple": 0}, "--channel-multiple must be at least 1, got 0"),
    ({"split_samples": 32}, "--split-samples 32 applies to --split search only; add --split search or drop"),
])
def test_validate_names_the_flag_and_the_range(changes, message):
    with pytest.raises(StreamPruneError, match=message):
        PruneOptions(**{"ratio": 0.2, **changes}).validate()


def test_none_means_the_computed_default():
    f = next(f for f in options.fields() if f.name == "alpha")
    assert check_value(f, None) is None


def test_speed_only_options_are_left_out_of_the_result_options():
    result = PruneOptions(ratio=0.2).result_options()
    assert "batch_size" not in result and "prefetch" not in result
    assert result["nsamples"] == 128 and result["ratio"] == 0.2


def test_paper_preset_names_real_fields():
    names = {f.name for f in options.fields()}
    assert set(PAPER_METHOD) <= names
    help_text = CliRunner().invoke(cli.main, ["run", "--help"]).output
    assert "--recovery affine" in " ".join(help_text.split())


def test_manifest_accepts_field_names_dashed_names_and_cli_flags():
    assert manifest.ALIASES["layers"] == ("num_pruned_layers", False)
    assert manifest.ALIASES["num_pruned_layers"] == ("num_pruned_layers", False)
    assert manifest.ALIASES["no-greedy"] == ("greedy", True)
    assert manifest.ALIASES["attention-scale"] == ("attention_scale", False)
    assert manifest.OPTION_TYPES["alpha"] is float and manifest.OPTION_TYPES["prefetch"] is bool


def test_device_defaults_to_auto_everywhere(monkeypatch):
    import torch

    from streamprune.devices import resolve_device

    assert PruneOptions(ratio=0.2).device == "auto"
    for command in ("run", "eval", "demo"):
        params = {p.name: p for p in cli.main.commands[command].params}
        assert params["device"].default == "auto", command
        assert "[default: auto]" in " ".join(CliRunner().invoke(cli.main, [command, "--help"]).output.split())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda", 0)


def test_method_switches_are_schema_fields_without_defaults_of_their_own():
    from streamprune.method_parts import MethodSwitches

    schema = {f.name: f for f in options.fields()}
    for f in dataclasses.fields(MethodSwitches):
        # `reconstruction` is assembled from the --reconstruct-* fields by PruneOptions.reconstruction().
        assert f.name in schema or f.name == "reconstruction", f"MethodSwitches.{f.name} is not a PruneOptions field"
        assert f.default is dataclasses.MISSING, f"MethodSwitches.{f.name} repeats a default"
    assert PruneOptions(ratio=0.2).switches().reconstruction is None
    settings = PruneOptions(ratio=0.2, reconstruct="both", reconstruct_lr=0.01, seed=3).switches().reconstruction
    assert settings.windows == ("attention", "mlp") and settings.lr == 0.01 and settings.seed == 3
    switches = PruneOptions(ratio=0.2, damping=0.3, recovery="affine", greedy=False).switches()
    assert (switches.damping, switches.recovery, switches.greedy) == (0.3, "affine", False)


def test_allocation_settings_are_schema_fields_without_defaults_of_their_own():
    from streamprune.allocation import AllocationSettings

    schema = {f.name: f for f in options.fields()}
    for f in dataclasses.fields(AllocationSettings):
        assert f.name in schema, f"AllocationSettings.{f.name} is not a PruneOptions field"
        assert f.default is dataclasses.MISSING, f"AllocationSettings.{f.name} repeats a default"
    settings = PruneOptions(ratio=0.2, channel_multiple=64, gqa_mode="groups", alpha=3.0).allocation_settings()
    assert (settings.channel_multiple, settings.gqa_mode, settings.alpha, settings.attention_scale) == (
        64, "groups", 3.0, None)


def test_maths_modules_do_not_import_the_options_schema():
    """least_squares (and the selectors built on it) take their settings as arguments: no import cycle
    options -> method_parts -> least_squares -> options."""
    import subprocess
    import sys

    code = ("import sys, streamprune.least_squares, streamprune.refit_selection, streamprune.allocation; "
            "print('streamprune.options' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_demo_ratio_is_the_schema_option_with_its_range_and_message():
    result = CliRunner().invoke(cli.main, ["demo", "--ratio", "1"])
    assert result.exit_code != 0
    assert "--ratio must be at least 0 and below 1, got 1.0" in result.output
