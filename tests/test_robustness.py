"""Bad input, crashes and resume, atomic output, determinism (issue: safe to run unattended)."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from streamprune.cli import main
from tests.helpers import (
    FAST,
    FAST_OPTIONS,
    assert_clean_failure,
    folder_digest,
    kill_then_resume,
    output_digest,
    run_cli,
    run_cli_process,
    run_to_the_end,
)
from tests.tiny_models import make_tiny_model


@pytest.fixture
def model(models, tmp_path):
    """A private, sharded copy of a tiny GQA model that a test may break."""
    dst = tmp_path / "model"
    shutil.copytree(models("llama-sharded"), dst)
    return dst


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _first_shard(model: Path) -> Path:
    return sorted(model.glob("model-*.safetensors"))[0]


def _break(model: Path, case: str) -> None:
    index = model / "model.safetensors.index.json"
    if case == "no_config":
        (model / "config.json").unlink()
    elif case == "unsupported":
        _edit_json(model / "config.json", model_type="gpt2")
    elif case == "missing_shard":
        _first_shard(model).unlink()
    elif case == "truncated_shard":
        shard = _first_shard(model)
        shard.write_bytes(shard.read_bytes()[:-100])
    elif case == "corrupt_shard":
        _first_shard(model).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    elif case == "index_missing_tensor":
        data = json.loads(index.read_text())
        data["weight_map"]["model.layers.0.mlp.extra.weight"] = _first_shard(model).name
        index.write_text(json.dumps(data))
    elif case == "shape_mismatch":
        _edit_json(model / "config.json", intermediate_size=170)


BROKEN_INPUTS = [
    ("no_config", "has no config.json"),
    ("unsupported", "unsupported architecture 'gpt2'"),
    ("missing_shard", "is missing from"),
    ("truncated_shard", "is truncated"),
    ("corrupt_shard", "truncated or corrupt"),
    ("index_missing_tensor", "but that shard lacks it"),
    ("shape_mismatch", "config.json implies"),
]


@pytest.mark.parametrize(("case", "message"), BROKEN_INPUTS)
def test_broken_model_folder_fails_cleanly_and_is_untouched(model, calib_file, tmp_path, case, message):
    _break(model, case)
    before = folder_digest(model)
    result = run_cli([str(model), str(tmp_path / "out"), "--ratio", "0.2", "--calib", str(calib_file), *FAST])
    assert_clean_failure(result, message)
    assert folder_digest(model) == before
    assert not (tmp_path / "out").exists()


BAD_ARGUMENTS = [
    (["--ratio", "1"], "--ratio must be at least 0 and below 1, got 1.0"),
    (["--ratio", "-0.1"], "--ratio must be at least 0 and below 1, got -0.1"),
    (["--ratio", "0.97"], "--ratio is too large: at most"),
    (["--nsamples", "0"], "--nsamples must be at least 1"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "mps"], "unsupported device 'mps'"),
    (["--device", "nonsense:x"], "unknown device"),
    (["--dtype", "int8"], "unknown --dtype 'int8'"),
    (["--split-samples", "4"], "--split-samples 4 applies to --split search only"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_ARGUMENTS)
def test_bad_arguments_fail_cleanly(model, calib_file, tmp_path, extra, message):
    before = folder_digest(model)
    args = [str(model), str(tmp_path / "out"), "--calib", str(calib_file), *FAST]
    if "--ratio" not in extra:
        args += ["--ratio", "0.2"]
    result = run_cli(args + extra)
    assert_clean_failure(result, message)
    assert folder_digest(model) == before and not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_gpu(model, calib_file, tmp_path):
    result = run_cli([str(model), str(tmp_path / "out"), "--ratio", "0.2", "--calib", str(calib_file), *FAST,
                   "--device", "cuda"])
    assert_clean_failure(result, "no CUDA GPU is available; use --device cpu")


def test_missing_model_dir(tmp_path, calib_file):
    result = run_cli([str(tmp_path / "nope"), str(tmp_path / "out"), "--ratio", "0.2", "--calib", str(calib_file)])
    assert_clean_failure(result, "does not exist")


def test_out_dir_equal_to_or_inside_model_dir(model, calib_file):
    before = folder_digest(model)
    for out in (model, model / "pruned"):
        result = run_cli([str(model), str(out), "--ratio", "0.2", "--calib", str(calib_file), *FAST])
        assert_clean_failure(result, "must not be MODEL_DIR or inside it")
    assert folder_digest(model) == before


def test_non_empty_out_dir_needs_overwrite(model, calib_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = run_cli([str(model), str(out), "--ratio", "0.2", "--calib", str(calib_file), *FAST])
    assert_clean_failure(result, "is not empty; pass --overwrite")
    assert (out / "keep.txt").read_text() == "precious"
    result = run_cli([str(model), str(out), "--ratio", "0.2", "--calib", str(calib_file), *FAST, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_rerunning_a_finished_run_is_already_complete_and_touches_nothing(model, calib_file, tmp_path):
    out = tmp_path / "out"
    args = [str(model), str(out), "--ratio", "0.2", "--calib", str(calib_file), *FAST]
    assert run_cli(args).exit_code == 0
    before, mtime = folder_digest(out), out.stat().st_mtime_ns
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines() == [
        f"already complete: {out} holds this run (same input and options); nothing to do"]
    assert folder_digest(out) == before and out.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]  # no staging folder either
    json_result = CliRunner().invoke(main, ["run", *args, "--json"])
    assert json_result.exit_code == 0 and json.loads(json_result.stdout)["fingerprint"]["options"]["ratio"] == 0.2


def test_rerunning_with_other_options_or_input_is_refused(model, calib_file, tmp_path):
    out = tmp_path / "out"
    args = [str(model), str(out), "--ratio", "0.2", "--calib", str(calib_file), *FAST]
    assert run_cli(args).exit_code == 0
    before = folder_digest(out)
    assert_clean_failure(run_cli([*args, "--nsamples", "5"]),
                         f"OUT_DIR {out} holds a finished run with other options or input (nsamples 4 -> 5); "
                         "pass --overwrite to replace it")
    shard = _first_shard(model)
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # "another checkpoint"
    assert_clean_failure(run_cli(args), "holds a finished run with other options or input (input checkpoint)")
    assert folder_digest(out) == before
    assert run_cli([*args, "--overwrite"]).exit_code == 0  # --overwrite redoes it
    assert "already complete" in run_cli(args).output


def test_a_run_from_before_an_option_existed_is_complete_while_that_option_keeps_its_default(model, calib_file,
                                                                                            tmp_path):
    """Reports list the options of their day; an option added since is absent there, and its default keeps the
    old result, so only a non-default value of it makes the run a different one."""
    out = tmp_path / "out"
    args = [str(model), str(out), "--ratio", "0.2", "--calib", str(calib_file), *FAST]
    assert run_cli(args).exit_code == 0
    report_path = out / "streamprune_report.json"
    report = json.loads(report_path.read_text())
    del report["fingerprint"]["options"]["channel_multiple"]  # as written before --channel-multiple existed
    report_path.write_text(json.dumps(report))
    assert "already complete" in run_cli(args).output
    assert_clean_failure(run_cli([*args, "--channel-multiple", "8"]),
                         "holds a finished run with other options or input (channel_multiple 1 -> 8)")


def test_prune_api_reports_an_already_complete_run(models, calib_file, tmp_path):
    from streamprune import prune
    from streamprune.errors import StreamPruneError

    options = {"calib": str(calib_file), "quiet": True, **FAST_OPTIONS}
    first = prune(models("llama-gqa"), tmp_path / "out", 0.2, **options)
    before = folder_digest(tmp_path / "out")
    again = prune(models("llama-gqa"), tmp_path / "out", 0.2, **options)
    assert (first.already_complete, again.already_complete) == (False, True)
    assert again.report == first.report and folder_digest(tmp_path / "out") == before
    with pytest.raises(StreamPruneError, match=r"other options or input \(seed 0 -> 1\)"):
        prune(models("llama-gqa"), tmp_path / "out", 0.2, seed=1, **options)


@pytest.mark.parametrize(
    ("calib", "message"),
    [("missing.txt", "not found"), ("empty.txt", "empty"), ("short.txt", "tokens")],
)
def test_bad_calibration_sources(model, tmp_path, calib, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("Too short.")
    result = run_cli([str(model), str(tmp_path / "out"), "--ratio", "0.2", "--calib", str(tmp_path / calib), *FAST])
    assert_clean_failure(result, message)


def test_disk_full_while_writing(model, calib_file, tmp_path, monkeypatch):
    import streamprune.checkpoint as checkpoint

    def full_disk(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    result = run_cli([str(model), str(tmp_path / "out"), "--ratio", "0.2", "--calib", str(calib_file), *FAST])
    assert_clean_failure(result, "No space left on device")
    assert "run the same command again to resume" in result.output
    assert not (tmp_path / "out").exists()


def test_fp16_overflow_names_the_layer(tmp_path, calib_file):
    src = make_tiny_model(tmp_path / "hot", "llama", kv_heads=4, layers=3)
    tensors = load_file(str(src / "model.safetensors"))
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        tensors[name] = tensors[name] * 3000.0  # fp16 tops out at 65504
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    args = [str(src), str(tmp_path / "out"), "--ratio", "0.2", "--calib", str(calib_file), *FAST]
    result = run_cli(args[:-2] + ["--dtype", "float16"])
    assert_clean_failure(result, "non-finite hidden states after layer 1")
    assert "--dtype float32" in result.output


# ----------------------------------------------------------------------------------------------
# Crashes, resume, determinism (real processes, killed with SIGKILL)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean_run(models, calib_file, tmp_path_factory):
    """(model, the run's flags, its output): one uninterrupted run that the crash tests compare against."""
    out = tmp_path_factory.mktemp("clean") / "out"
    src, flags = str(models("llama-sharded")), ["--ratio", "0.3", "--calib", str(calib_file), *FAST]
    run_to_the_end([src, str(out), *flags])
    return src, flags, out


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["pass1:2", "pass2:1", "write:3", "finalize"])
def test_kill_9_then_resume_gives_identical_output(clean_run, tmp_path, fault):
    src, flags, clean_out = clean_run
    kill_then_resume(src, tmp_path / "out", flags, fault)
    assert output_digest(tmp_path / "out") == output_digest(clean_out)


@pytest.mark.slow
def test_ctrl_c_stops_at_a_layer_boundary_and_resumes(clean_run, tmp_path):
    src, flags, clean_out = clean_run
    args = [src, str(tmp_path / "out"), *flags]
    stopped = run_cli_process(args, "int@pass2:1")
    assert stopped.returncode == 130
    assert "interrupted after layer 1 of pass 2; run the same command again to resume" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    run_to_the_end(args)
    assert output_digest(tmp_path / "out") == output_digest(clean_out)


@pytest.mark.slow
def test_resume_with_different_options_is_refused_until_restart(clean_run, tmp_path):
    src, flags, _ = clean_run
    out = tmp_path / "out"
    assert run_cli_process([src, str(out), *flags], "pass2:1").returncode == -9
    changed = [src, str(out), *(a if a != "0.3" else "0.25" for a in flags)]
    refused = run_cli_process(changed)
    assert refused.returncode == 2
    assert "holds an unfinished run with different options" in refused.stderr and "--restart" in refused.stderr
    run_to_the_end(changed + ["--restart"])
    assert json.loads((out / "streamprune_report.json").read_text())["options"]["ratio"] == 0.25


@pytest.mark.slow
def test_two_clean_runs_are_byte_identical(clean_run, tmp_path):
    src, flags, clean_out = clean_run
    run_to_the_end([src, str(tmp_path / "again"), *flags])
    assert output_digest(tmp_path / "again") == output_digest(clean_out)
