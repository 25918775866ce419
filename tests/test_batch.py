"""`streamprune batch`: manifests, isolation of failing jobs, rerun/resume, shared work, summary, Ray."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from streamprune import cli
from streamprune.batch import BatchSettings, Job, load_manifest, run_batch, run_job
from streamprune.cli import main
from tests.helpers import FAST_OPTIONS, write_csv


def _batch(*args: str):
    return CliRunner().invoke(main, ["batch", *map(str, args)])


# ----------------------------------------------------------------------------------------------
# Manifest parsing and validation (nothing runs)
# ----------------------------------------------------------------------------------------------


def test_csv_accepts_field_names_cli_spellings_and_typed_cells(tmp_path):
    (tmp_path / "calib.txt").write_text("text")
    manifest = write_csv(tmp_path / "jobs.csv",
                    "model_dir,out_dir,ratio,calib,nsamples,gqa-mode,no-greedy,feature_space,layers,alpha",
                    "m,out/a,0.2,calib.txt,16,groups,yes,0,3,",
                    "m,out/b,0.5,wikitext:wikitext-2-raw-v1:train,,,false,TRUE,,7.5",
                    "# a comment row,,,,,,,,,",
                    "",
                    "/abs/model,/abs/out,0.3,self,,,,,,")
    a, b, c = load_manifest(manifest)
    assert (a.number, a.model_dir, a.out_dir) == (1, str(tmp_path / "m"), str(tmp_path / "out" / "a"))
    assert a.options == {"ratio": 0.2, "calib": str(tmp_path / "calib.txt"), "nsamples": 16, "gqa_mode": "groups",
                         "greedy": False, "feature_space": False, "num_pruned_layers": 3}
    # Empty cells keep the defaults; a dataset spec is not a path.
    assert b.options == {"ratio": 0.5, "calib": "wikitext:wikitext-2-raw-v1:train", "greedy": True,
                         "feature_space": True, "alpha": 7.5}
    assert (c.number, c.model_dir, c.options) == (3, "/abs/model", {"ratio": 0.3, "calib": "self"})
    assert a.log_path == str(tmp_path / "out" / "a.log")


def test_manifest_resolves_each_file_of_a_calibration_mixture(tmp_path):
    (tmp_path / "calib.txt").write_text("text")
    manifest = write_csv(tmp_path / "jobs.csv", "model_dir,out_dir,ratio,calib",
                    "m,out/a,0.2,calib.txt+builtin+self",
                    "m,out/b,0.2,wikitext:wikitext-2-raw-v1:train+data/more.txt")
    a, b = load_manifest(manifest)
    assert a.options["calib"] == f"{tmp_path / 'calib.txt'}+builtin+self"
    assert b.options["calib"] == f"wikitext:wikitext-2-raw-v1:train+{tmp_path / 'data' / 'more.txt'}"


def test_yaml_manifest_reads_likewrite_csv(tmp_path):
    (tmp_path / "jobs.yaml").write_text(
        "- {model_dir: m, out_dir: out/a, ratio: 0.2, gqa-mode: groups, no-greedy: true, batch-size: 4}\n"
        "- model_dir: m\n  out_dir: out/b\n  ratio: 0.35\n  nsamples: 8\n  layers:\n  regression: no\n")
    a, b = load_manifest(tmp_path / "jobs.yaml")
    assert a.options == {"ratio": 0.2, "gqa_mode": "groups", "greedy": False, "batch_size": 4}
    assert b.options == {"ratio": 0.35, "nsamples": 8, "regression": False}
    assert b.out_dir == str(tmp_path / "out" / "b")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("jobs.csv", "model_dir,out_dir,ratio,nsample\nm,o,0.2,4\n",
         "unknown column 'nsample' in jobs.csv (did you mean 'nsamples'?); valid columns: model_dir, out_dir, ratio"),
        ("jobs.csv", "model_dir,out_dir\nm,o\n", "jobs.csv has no ratio column"),
        ("jobs.csv", "model_dir,out_dir,ratio\nm,o1,0.2\nm,o2,\n", "job 2 (line 3): missing ratio"),
        ("jobs.csv", "model_dir,out_dir,ratio,nsamples\nm,o,0.2,many\n",
         "job 1 (line 2): nsamples must be a whole number, got 'many'"),
        ("jobs.csv", "model_dir,out_dir,ratio\nm,o,1.5\nm,p,abc\n",
         "job 1 (line 2): ratio must be at least 0 and below 1, got 1.5; job 2 (line 3): ratio must be a number"),
        ("jobs.csv", "model_dir,out_dir,ratio,uniform\nm,o,0.2,maybe\n", "uniform must be true/false"),
        ("jobs.csv", "model_dir,out_dir,ratio,gqa-mode\nm,o,0.2,kv\n", "gqa-mode must be one of heads, groups"),
        ("jobs.csv", "model_dir,out_dir,ratio\nm,o,0.2\nn,o,0.3\n", "jobs 1 and 2 both write"),
        ("jobs.csv", "model_dir,out_dir,ratio,gqa_mode,gqa-mode\nm,o,0.2,heads,heads\n", "gives gqa_mode twice"),
        ("jobs.yaml", "- {model_dir: m, ratio: 0.2}\n", "invalid manifest jobs.yaml: job 1: missing out_dir"),
        ("jobs.yaml", "- {model_dir: m, out_dir: o, ratio: 0.2, seqlens: 4}\n", "unknown column 'seqlens'"),
        ("jobs.yaml", "model_dir: m\n", "jobs.yaml must be a list of mappings"),
        ("jobs.txt", "whatever\n", "use a .csv, .yaml/.yml or .json file"),
        ("jobs.csv", "model_dir,out_dir,ratio\nm,o,0.2,extra\n", "jobs.csv line 2 has more cells than the header"),
        ("jobs.csv", "model_dir,out_dir,ratio\n" + "".join(f"m,o{i},{i}\n" for i in range(2, 9)),
         "job 5 (line 6): ratio must be at least 0 and below 1, got 6.0; and 2 more"),
        ("jobs.json", '[{"model_dir": "m",', "jobs.json is not valid JSON"),
        ("jobs.yaml", "- {model_dir: m\n", "jobs.yaml is not valid YAML"),
        ("jobs.yaml", "[]\n", "manifest jobs.yaml lists no jobs"),
    ],
)
def test_bad_manifests_fail_before_running_with_one_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    result = _batch(tmp_path / name)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert "Traceback" not in result.output
    assert not any(tmp_path.glob("*.log")) and not (tmp_path / ".streamprune-cache").exists()


def test_each_job_is_the_public_run_command_with_the_rows_options(tmp_path):
    """The job's argv is `python -m streamprune run ...`, and `run` parses it back to the row's options."""
    from streamprune.batch.jobs import prepare_jobs, run_command
    from streamprune.options import PruneOptions

    manifest = tmp_path / "jobs.yaml"
    manifest.write_text("- {model_dir: m, out_dir: out/a, ratio: 0.35, no-greedy: true, uniform: yes, layers: 3,\n"
                        "   gqa-mode: groups, alpha: 7.5, damping: 1e-5, prefetch: false, feature_space: true}\n")
    [job] = prepare_jobs(load_manifest(manifest), manifest, BatchSettings(overwrite=True))
    argv = run_command(job)
    assert argv[:6] == [sys.executable, "-m", "streamprune", "run", str(tmp_path / "m"), str(tmp_path / "out" / "a")]
    assert argv[-5:] == ["--shared-cache", str(tmp_path / ".streamprune-cache"), "--overwrite", "--quiet", "--json"]
    params = cli.run.make_context("run", argv[4:]).params
    names = [f.name for f in dataclasses.fields(PruneOptions)]
    assert PruneOptions(**{n: params[n] for n in names}) == PruneOptions(**job.options)
    assert PruneOptions(**job.options) != PruneOptions(ratio=0.35)  # the row did change options
    assert params["shared_cache"] == job.shared_cache and params["as_json"] and params["quiet"]
    assert params["overwrite"] and not params["restart"]


# ----------------------------------------------------------------------------------------------
# Finished jobs: skipped exactly when `streamprune run` would say "already complete" (no process starts)
# ----------------------------------------------------------------------------------------------


def _finished_job(models, tmp_path, **options) -> Job:
    """A job on a private copy of a tiny model, and an OUT_DIR holding a report of its run as the engine
    writes one (with the engine's fingerprint of that model and those options)."""
    from streamprune.checkpoint import CheckpointReader
    from streamprune.options import PruneOptions
    from streamprune.output import REPORT_NAME
    from streamprune.run_state import run_fingerprint

    model = shutil.copytree(models("llama-gqa"), tmp_path / "model")
    job = Job(1, str(model), str(tmp_path / "out"), {"ratio": 0.2, **FAST_OPTIONS, **options})
    report = {"fingerprint": run_fingerprint(CheckpointReader(model), PruneOptions(**job.options)),
              "options": job.options, "params_before": 100, "params_after": 80, "achieved_ratio": 0.2}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / REPORT_NAME).write_text(json.dumps(report))
    return job


def test_a_job_whose_run_is_finished_is_skipped_without_a_process(models, tmp_path):
    job = _finished_job(models, tmp_path)
    summary = run_job(job)
    assert (summary["status"], summary["params_after"]) == ("skipped", 80)
    assert not Path(job.log_path).exists()  # no child was started
    # Options that do not change the output (speed only) are not part of the run's identity.
    assert run_job(dataclasses.replace(job, options={**job.options, "prefetch": False}))["status"] == "skipped"


@pytest.mark.parametrize(("change", "difference"), [
    ("options", "nsamples 4 -> 5"),
    ("weights", "input checkpoint"),  # same folder, same options: only the shards' content changed
    ("config", "input checkpoint"),
])
def test_a_finished_run_of_other_options_or_input_is_refused_like_run_does(models, tmp_path, change, difference):
    job = _finished_job(models, tmp_path)
    model = Path(job.model_dir)
    if change == "options":
        job = dataclasses.replace(job, options={**job.options, "nsamples": 5})
    elif change == "weights":
        shard = model / "model.safetensors"
        os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # rewritten in place
    else:
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 2 * config["rms_norm_eps"]}))
    summary = run_job(job)
    assert summary["status"] == "failed" and not Path(job.log_path).exists()
    assert summary["error"] == (f"{job.out_dir} holds a finished run with other options or input ({difference}); "
                                "pass --overwrite to replace it")


def test_an_unreadable_model_folder_leaves_the_decision_to_the_job(models, tmp_path):
    """Without a model to fingerprint the job runs, and the engine reports what is wrong (here: no folder)."""
    job = _finished_job(models, tmp_path)
    shutil.rmtree(job.model_dir)
    summary = run_job(job)
    assert summary["status"] == "failed" and "model folder" in summary["error"] and "does not exist" in summary["error"]
    assert Path(job.log_path).is_file()


def test_ray_executor_without_ray_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("no ray here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    manifest = write_csv(tmp_path / "jobs.csv", "model_dir,out_dir,ratio", "m,o,0.2")
    result = _batch(manifest, "--executor", "ray")
    assert result.exit_code == 2
    assert "pip install 'streamprune[ray]'" in result.output


# ----------------------------------------------------------------------------------------------
# Running jobs (each job is a real child process)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_ratios_and_a_failure(models, calib_file, tmp_path_factory):
    """One CSV batch: three ratios of one model, then a job whose model folder does not exist."""
    root = tmp_path_factory.mktemp("batch")
    shutil.copytree(models("llama-gqa"), root / "model")
    shutil.copy(calib_file, root / "calib.txt")
    fast = FAST_OPTIONS
    rows = [f"model,out/r{int(r * 100)},{r},calib.txt,{fast['nsamples']},{fast['seqlen']},{fast['dtype']}"
            for r in (0.2, 0.35, 0.5)]
    rows.append("no-such-model,out/bad,0.2,calib.txt,4,16,float32")
    manifest = write_csv(root / "jobs.csv", "model_dir,out_dir,ratio,calib,nsamples,seqlen,dtype", *rows)
    result = _batch(manifest, "--json", root / "summary.json")
    return root, manifest, result


@pytest.mark.slow
def test_a_failing_job_is_reported_and_the_others_finish(three_ratios_and_a_failure):
    root, _, result = three_ratios_and_a_failure
    assert result.exit_code == 1, result.output
    for name in ("r20", "r35", "r50"):
        assert (root / "out" / name / "config.json").is_file()
    table = result.stdout.splitlines()
    assert table[0].split()[:5] == ["#", "model", "out", "ratio", "status"]
    assert [line.split()[4] for line in table[1:5]] == ["ok", "ok", "ok", "failed"]
    assert "job 4 failed: exit 2: model folder" in result.stdout and "does not exist (log: " in result.stdout
    assert "3 ok, 1 failed" in result.stdout


@pytest.mark.slow
def test_every_job_has_a_log_next_to_its_output(three_ratios_and_a_failure):
    root, _, _ = three_ratios_and_a_failure
    for name in ("r20", "r35", "r50", "bad"):
        log = (root / "out" / f"{name}.log").read_text()
        assert log.startswith("=== ") and " -m streamprune run " in log and log.splitlines()[0].endswith(" --json")
    assert "error: model folder" in (root / "out" / "bad.log").read_text()
    assert '"params_after"' in (root / "out" / "r35.log").read_text()  # the job's report, as JSON


@pytest.mark.slow
def test_summary_json_lists_every_job(three_ratios_and_a_failure):
    root, manifest, _ = three_ratios_and_a_failure
    summary = json.loads((root / "summary.json").read_text())
    assert summary["manifest"] == str(manifest) and summary["executor"] == "local" and summary["exit_code"] == 1
    assert summary["counts"] == {"ok": 3, "skipped": 0, "failed": 1, "interrupted": 0, "not_run": 0}
    assert summary["shared_cache"] == str(root / ".streamprune-cache")
    jobs = summary["jobs"]
    assert [j["job"] for j in jobs] == [1, 2, 3, 4] and [j["ratio"] for j in jobs] == [0.2, 0.35, 0.5, 0.2]
    for job in jobs[:3]:
        assert job["status"] == "ok" and job["error"] is None
        assert job["params_after"] < job["params_before"]
        assert abs(job["achieved_ratio"] - job["ratio"]) < 0.01
        assert job["seconds"] > 0 and job["peak_rss_mb"] > 50
        assert job["log"] == str(Path(job["out_dir"]).parent / (Path(job["out_dir"]).name + ".log"))
    assert jobs[3]["status"] == "failed" and "does not exist" in jobs[3]["error"]


@pytest.mark.slow
def test_ratios_of_one_model_share_the_dense_pass(three_ratios_and_a_failure):
    root, _, result = three_ratios_and_a_failure
    reports = [json.loads((root / "out" / n / "streamprune_report.json").read_text()) for n in ("r20", "r35", "r50")]
    assert [r["dense_scores_reused"] for r in reports] == [False, True, True]
    summary = json.loads((root / "summary.json").read_text())
    assert summary["shared_work"]["jobs_reusing_dense_pass"] == [2, 3]
    assert summary["shared_work"]["estimated_seconds_saved"] > 0
    assert "shared work: job(s) 2, 3 reused" in result.stdout
    assert len(list((root / ".streamprune-cache").glob("dense-scores-*.json"))) == 1


@pytest.mark.slow
def test_rerun_skips_finished_jobs(three_ratios_and_a_failure):
    root, manifest, _ = three_ratios_and_a_failure
    fixed = root / "fixed.csv"
    fixed.write_text("".join(manifest.read_text().splitlines(keepends=True)[:4]))  # without the broken job
    before = (root / "out" / "r20.log").read_text()
    result = _batch(fixed)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("skipped (done)") == 3 and "3 skipped" in result.stdout
    assert (root / "out" / "r20.log").read_text() == before  # no process was started


@pytest.mark.slow
def test_changed_options_are_not_skipped(three_ratios_and_a_failure):
    root, _, _ = three_ratios_and_a_failure
    manifest = write_csv(root / "changed.csv", "model_dir,out_dir,ratio,calib,nsamples,seqlen,dtype",
                    "model,out/r20,0.2,calib.txt,5,16,float32")
    result = _batch(manifest)
    assert result.exit_code == 1
    assert "holds a finished run with other options or input (nsamples 4 -> 5); pass --overwrite" in result.stdout


@pytest.mark.slow
def test_a_model_changed_in_place_is_refused_then_rerun_with_overwrite(models, calib_file, tmp_path):
    """The same manifest row after the model folder's weights were replaced: the finished run no longer
    matches (the engine's fingerprint), so the job fails like `run` does, and --overwrite prunes it again."""
    model = shutil.copytree(models("llama-gqa"), tmp_path / "model")
    fast = FAST_OPTIONS
    manifest = write_csv(tmp_path / "jobs.csv", "model_dir,out_dir,ratio,calib,nsamples,seqlen,dtype",
                    f"model,out/r20,0.2,{calib_file},{fast['nsamples']},{fast['seqlen']},{fast['dtype']}")
    assert _batch(manifest).exit_code == 0
    assert "skipped (done)" in _batch(manifest).stdout
    shard = model / "model.safetensors"
    shard.write_bytes(shard.read_bytes())  # rewritten: a new modification time, as a re-download gives
    refused = _batch(manifest)
    assert refused.exit_code == 1 and "other options or input (input checkpoint)" in refused.stdout
    assert _batch(manifest, "--overwrite").exit_code == 0
    assert "skipped (done)" in _batch(manifest).stdout


@pytest.mark.slow
def test_killed_job_is_reported_and_resumes_on_rerun(models, calib_file, tmp_path, monkeypatch):
    """A YAML batch whose job is SIGKILLed mid-way (as by the OOM killer), then run again."""
    manifest = tmp_path / "jobs.yaml"
    manifest.write_text(f"- model_dir: {models('llama-mha')}\n  out_dir: out/r30\n  ratio: 0.3\n"
                        f"  calib: {calib_file}\n  nsamples: 4\n  seqlen: 16\n  dtype: float32\n")
    monkeypatch.setenv("STREAMPRUNE_FAULT", "pass2:1")
    killed = _batch(manifest)
    assert killed.exit_code == 1
    assert "killed by SIGKILL (out of memory?)" in killed.stdout
    assert (tmp_path / "out" / ".r30.streamprune-partial" / "state.json").is_file()
    assert not (tmp_path / "out" / "r30").exists()
    monkeypatch.delenv("STREAMPRUNE_FAULT")
    resumed = _batch(manifest)
    assert resumed.exit_code == 0, resumed.output
    assert (tmp_path / "out" / "r30" / "streamprune_report.json").is_file()
    assert not (tmp_path / "out" / ".r30.streamprune-partial").exists()
    assert (tmp_path / "out" / "r30.log").read_text().count("=== ") == 2  # both attempts in one log


@pytest.mark.slow
def test_ray_executor_runs_jobs_as_tasks_on_a_local_instance(models, calib_file, tmp_path):
    ray = pytest.importorskip("ray")
    manifest = write_csv(tmp_path / "jobs.csv", "model_dir,out_dir,ratio,calib,nsamples,seqlen,dtype",
                    *[f"{models('llama-gqa')},out/r{r},0.{r},{calib_file},4,16,float32" for r in (25, 40)])
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        summary = run_batch(manifest, BatchSettings(executor="ray", cpus_per_job=1))
    finally:
        ray.shutdown()
    assert summary["exit_code"] == 0, summary
    assert [j["status"] for j in summary["jobs"]] == ["ok", "ok"]
    # Both tasks start at once; the cache entry's lock lets whichever comes first run the dense pass.
    assert sorted(j["dense_scores_reused"] for j in summary["jobs"]) == [False, True]
    for name in ("r25", "r40"):
        assert (tmp_path / "out" / name / "config.json").is_file() and (tmp_path / "out" / f"{name}.log").is_file()


@pytest.mark.slow
def test_an_interrupted_job_stops_the_batch_resumably(models, calib_file, tmp_path, monkeypatch):
    rows = [f"{models('llama-mha')},out/r{r},0.{r},{calib_file},4,16,float32" for r in (20, 40)]
    manifest = write_csv(tmp_path / "jobs.csv", "model_dir,out_dir,ratio,calib,nsamples,seqlen,dtype", *rows)
    monkeypatch.setenv("STREAMPRUNE_FAULT", "int@pass2:1")  # a Ctrl-C reaching the job
    result = _batch(manifest, "--json", tmp_path / "summary.json")
    assert result.exit_code == 130, result.output
    assert [j["status"] for j in json.loads((tmp_path / "summary.json").read_text())["jobs"]] == [
        "interrupted", "not_run"]
    assert "job 1 interrupted: exit 130: interrupted after layer 1 of pass 2" in result.stdout
    assert (tmp_path / "out" / ".r20.streamprune-partial" / "state.json").is_file()
