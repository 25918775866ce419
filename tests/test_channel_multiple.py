"""`--channel-multiple N` end to end: pruned folders whose FFN widths are multiples of N, the option in the CLI and
batch manifests, its one-line errors, and a DeciLM export with `--ffn-multiple` that then pads nothing.

The allocation maths (every model shape, the exact-target bound, N = 1 as before) is in test_allocation.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import streamprune
from streamprune.allocation import AllocationSettings, RemovalCounter
from streamprune.architecture import read_shape
from streamprune.cli import main
from streamprune.export_decilm import export_decilm, ffn_mult_width
from tests.conftest import CALIB
from tests.helpers import FAST
from tests.tiny_models import make_tiny_model

FFN = 256  # the tiny models' FFN width: N = 64 leaves 64, 128 or 192 channels in a pruned layer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny(family) -> a 4-layer model with FFN width 256, built once per module."""
    root = tmp_path_factory.mktemp("chmult-models")
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = make_tiny_model(root / family, family, kv_heads=4, ffn=FFN)
        return cache[family]

    return get


def _ffn_widths(out_dir: Path) -> list[int]:
    """Each layer's FFN width as stored: down_proj's input dimension, read from the safetensors headers."""
    from safetensors import safe_open

    index = json.loads((out_dir / "model.safetensors.index.json").read_text())["weight_map"]
    widths = []
    for i in range(len([k for k in index if k.endswith("mlp.down_proj.weight")])):
        name = f"model.layers.{i}.mlp.down_proj.weight"
        with safe_open(out_dir / index[name], "pt") as fh:
            widths.append(fh.get_slice(name).get_shape()[1])
    return widths


@pytest.mark.parametrize("multiple", [8, 64])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_pruned_ffn_widths_are_multiples_and_the_ratio_is_within_half_a_step(tiny, calib_file, tmp_path, family,
                                                                              multiple):
    model = tiny(family)
    ratio = 0.25
    result = streamprune.prune(model, tmp_path / "out", ratio, calib=str(calib_file), channel_multiple=multiple,
                               **{**CALIB, "attention_scale": None})
    widths = _ffn_widths(result.out_dir)
    config = json.loads((result.out_dir / "config.json").read_text())
    assert [c["intermediate_size"] for c in config["layer_configs"]] == widths
    pruned = [w for w in widths if w < FFN]
    assert pruned and all(w % multiple == 0 and w >= multiple for w in pruned), widths
    shape = read_shape(json.loads((model / "config.json").read_text()))
    settings = AllocationSettings("heads", True, None, None, None, multiple)
    step = RemovalCounter.for_settings(shape, settings).per_step
    report = result.report
    assert report["allocation"]["params_after"] == report["params_after"]  # the plan is what was written
    assert abs(report["params_after"] - (1 - ratio) * report["params_before"]) <= step / 2


def test_the_option_is_on_the_command_line_and_in_batch_manifests(tmp_path):
    from streamprune.batch import load_manifest
    from streamprune.batch.jobs import run_command

    help_text = CliRunner().invoke(main, ["run", "--help"]).output
    entry = help_text.split("--channel-multiple INTEGER")[1].split("\n  --")[0]  # up to the next option
    assert "[default: 1]" in " ".join(entry.split())  # click wraps its help to the terminal's width
    manifest = tmp_path / "jobs.csv"
    manifest.write_text("model_dir,out_dir,ratio,channel-multiple\nm,a,0.2,64\nm,b,0.2,\n")
    a, b = load_manifest(manifest)
    assert a.options["channel_multiple"] == 64 and "channel_multiple" not in b.options
    argv = run_command(a)
    assert argv[argv.index("--channel-multiple") + 1] == "64"
    manifest.write_text("model_dir,out_dir,ratio,channel_multiple\nm,a,0.2,0\n")
    with pytest.raises(streamprune.StreamPruneError, match=r"\(line 2\): channel-multiple must be at least 1, got 0"):
        load_manifest(manifest)


@pytest.mark.parametrize(("value", "message"), [
    ("0", "--channel-multiple must be at least 1, got 0"),
    ("-64", "--channel-multiple must be at least 1, got -64"),
    (str(FFN), f"--channel-multiple must be below the FFN width {FFN} (a pruned layer keeps a positive multiple "
               f"of it), got {FFN}"),
])
def test_bad_values_are_refused_in_one_line_before_any_work(tiny, calib_file, tmp_path, value, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(tiny("llama")), str(out), "--ratio", "0.2", "--calib",
                                       str(calib_file), *FAST, "--channel-multiple", value])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert lines == [f"error: {message}"], result.output
    assert list(tmp_path.iterdir()) == []  # no OUT_DIR, no staging folder: refused before the dense pass


def test_decilm_ffn_multiple_adds_no_padding_to_widths_already_multiples_of_256(calib_file, tmp_path):
    """`run --channel-multiple 256` then the DeciLM export with `--ffn-multiple 256`: every width is what ffn_mult
    gives back, so the FFN gets no zero channels and the export writes exactly the bytes of the exact-width
    export (whose own padding is the zero biases the recovery's down_proj biases bring, not FFN channels).
    Without --channel-multiple the same export pads."""
    model = make_tiny_model(tmp_path / "model", "llama", layers=3, hidden=256, heads=4, kv_heads=2, head_dim=64,
                            ffn=1024)
    runs = {}
    for multiple in (1, 256):
        out = tmp_path / f"pruned-{multiple}"
        args = ["run", model, out, "--ratio", "0.2", "--calib", calib_file, *FAST, "--channel-multiple", multiple,
                "--decilm", tmp_path / f"vllm-{multiple}", "--decilm-ffn-multiple", "256"]
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        runs[multiple] = (out, export_decilm(out, tmp_path / f"exact-{multiple}"),
                          export_decilm(out, tmp_path / f"mult-{multiple}", 256, overwrite=False))
    out, exact, padded = runs[256]
    widths = _ffn_widths(out)
    assert min(widths) < 1024 and all(w % 256 == 0 for w in widths)
    assert [p.ffn_written for p in padded.layers] == [p.ffn for p in padded.layers] == widths
    blocks = json.loads((tmp_path / "vllm-256" / "config.json").read_text())["block_configs"]
    assert [ffn_mult_width(b["ffn"]["ffn_mult"], 256) for b in blocks] == widths
    assert (padded.bytes, padded.padding_bytes) == (exact.bytes, exact.padding_bytes)
    _, exact_1, padded_1 = runs[1]
    assert padded_1.padding_bytes > exact_1.padding_bytes  # the default widths are padded
