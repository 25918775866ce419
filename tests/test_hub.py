"""MODEL_DIR as a Hugging Face Hub repo id, resolved offline through a cache laid out like huggingface_hub's."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from streamprune.cli import main
from streamprune.errors import StreamPruneError
from streamprune.hub import looks_like_repo_id, resolve_model_dir


def test_repo_id_resolves_to_the_cached_snapshot(hub_cache):
    assert resolve_model_dir(hub_cache.repo_id) == hub_cache.snapshot


def test_an_existing_folder_wins_over_the_hub(tmp_path, hub_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-org" / "tiny-llama").mkdir(parents=True)
    assert resolve_model_dir("tiny-org/tiny-llama").resolve() == tmp_path / "tiny-org" / "tiny-llama"


@pytest.mark.parametrize("name, is_id", [("org/name", True), ("Org-1/model.v2_x", True), ("name", False),
                                         ("/abs/path", False), ("./rel/x", False), ("a/b/c", False),
                                         ("org/name.", False), ("org/../x", False)])
def test_looks_like_repo_id(name, is_id):
    assert looks_like_repo_id(name) is is_id


def test_uncached_repo_offline_is_one_clear_line(hub_cache):
    with pytest.raises(StreamPruneError) as info:
        resolve_model_dir("tiny-org/not-downloaded")
    assert str(info.value) == ("MODEL_DIR tiny-org/not-downloaded: no such folder, and not in the Hugging Face "
                               "cache (offline mode is on); download it first or pass a local folder")


def test_run_and_eval_accept_a_repo_id(hub_cache, calib_file, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", hub_cache.repo_id, str(out), "--ratio", "0.2", "--calib",
                                       str(calib_file), "--nsamples", "4", "--seqlen", "16", "--quiet"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["eval", str(out), "--text", str(calib_file), "--seqlen", "16",
                                       "--reference", hub_cache.repo_id, "--quiet"])
    assert result.exit_code == 0, result.output
    assert "top-1 agreement" in result.output and "reference perplexity" in result.output


def test_cli_uncached_repo_is_one_line_without_traceback(hub_cache, calib_file, tmp_path):
    for args in (["eval", "tiny-org/missing", "--text", str(calib_file)],
                 ["run", "tiny-org/missing", str(tmp_path / "o"), "--ratio", "0.2", "--calib", str(calib_file)]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and "not in the Hugging Face cache (offline mode is on)" in lines[0]
        assert not (tmp_path / "o").exists()
