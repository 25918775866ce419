"""Calibration data: text sources to (nsamples, seqlen) token ids, or samples from the model itself.

Behaviour (what SlimLLM / LLM-Pruner do, made explicit):

* Sources: ``builtin`` (varied public-domain English prose shipped with streamprune, about 33k
  tokens; see ``streamprune/data/README.md``), a local ``.txt`` (the whole file is one document:
  paragraph breaks stay newlines, no EOS is inserted inside it), ``.jsonl`` / ``.json`` (field
  ``text``, or the only string field; a JSON list of strings works too), ``.parquet`` (column ``text``
  or the only string column), or a ``datasets`` spec ``name[:config][:split]`` (default split
  ``train``; slices such as ``train[:2000]`` are passed through).
  ``wikitext`` rows are lines of running articles, not documents, so they are joined into one stream.
* Mixtures: ``A+B[+C...]`` (for example ``wikitext:wikitext-2-raw-v1:train+self``) draws an equal share of
  the ``nsamples`` windows from each source (the first sources take the remainder), each source with the
  same seed. Text like what the model will serve helps most, and a mixture covers several kinds
  (docs/results.md, "Calibration text"). A file whose name contains ``+`` is still one source when it exists.
* ``random``: uniform random token ids (``torch.randint`` seeded with ``seed``), for speed benchmarks on
  checkpoints without a tokenizer; the vocabulary size comes from the model's config.json.
* Offline: a ``datasets`` spec needs the Hub. With offline mode on (``HF_HUB_OFFLINE``) only a cached copy
  is used; when the Hub does not answer one quick request, loading stops at once (instead of the Hub
  libraries' retries) and the message names ``--calib builtin`` or a local file.
* Documents are tokenized without special tokens and concatenated with the tokenizer's EOS *between*
  them (none when the tokenizer has no EOS). No BOS appears inside the stream.
* Windows: ``nsamples`` random start offsets drawn with ``random.Random(seed)``; windows may overlap
  (as in the reference code), so one window's worth of tokens is enough. A warning is logged when the
  text is shorter than ``nsamples`` disjoint windows.
* BOS: if the tokenizer itself prepends BOS when encoding (LLaMA, Mistral, Llama-3), every window starts
  with BOS followed by ``seqlen - 1`` text tokens, because that is what the model sees at inference (and
  the BOS "attention sink" shapes the activations being measured). Otherwise windows are ``seqlen`` text
  tokens. Either way the result is exactly ``(nsamples, seqlen)``.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .errors import StreamPruneError
from .options import option_problem

log = logging.getLogger(__name__)

FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
SPLIT_NAMES = ("train", "validation", "test")
# Datasets whose rows are consecutive lines of articles (LLM-Pruner joins them) rather than documents.
LINE_DATASETS = ("wikitext",)
LOCAL_HINT = "pass a local .txt/.jsonl/.json/.parquet file instead"
OFFLINE_HINT = ("offline, pass --calib builtin (English prose shipped with streamprune) or a local "
                ".txt/.jsonl/.json/.parquet file")
HUB_PROBE_SECONDS = 3.0  # one request; the Hub libraries retry an unreachable Hub for about 30 s
_TOKENIZE_BATCH = 1000  # documents per tokenizer call: parallel in fast tokenizers, bounded memory
BUILTIN = "builtin"
BUILTIN_TEXT = Path(__file__).with_name("data") / "demo_calibration.txt"
RANDOM = "random"


class CalibrationError(StreamPruneError, ValueError):
    """A calibration source problem, phrased in one line as what is wrong and what to do."""


# ----------------------------------------------------------------------------------------------------
# Sources


def split_sources(spec: str, base: Path = Path()) -> list[str]:
    """The sources of a mixture ``A+B`` (one source when ``spec`` is an existing file, relative paths taken from
    ``base``, or has no ``+``)."""
    if "+" not in spec or (base / Path(spec).expanduser()).exists():
        return [spec]
    parts = [part.strip() for part in spec.split("+")]
    if not all(parts):
        raise CalibrationError(f"calibration mixture {spec!r} has an empty part; write it as SOURCE+SOURCE")
    return parts


def mixture_shares(nsamples: int, parts: int) -> list[int]:
    """Windows per source: equal shares, the remainder to the first sources (7 over 3: [3, 2, 2])."""
    if nsamples < parts:
        raise CalibrationError(f"--nsamples {nsamples} is fewer than the {parts} calibration sources mixed; "
                               f"use at least {parts}")
    return [nsamples // parts + (i < nsamples % parts) for i in range(parts)]


def describe_source(source: str) -> str:
    """One line for reports and logs, e.g. ``file wiki.txt (1.2 MB)``; mixtures join their parts with +."""
    parts = split_sources(source)
    if len(parts) > 1:
        return " + ".join(describe_source(part) for part in parts)
    if source == "self":
        return "self-generated samples from the model"
    if source == RANDOM:
        return "random token ids"
    if source == BUILTIN:
        return f"built-in English prose ({_human_size(BUILTIN_TEXT.stat().st_size)}, shipped with streamprune)"
    path = Path(source).expanduser()
    if path.is_file():
        return f"file {path.name} ({_human_size(path.stat().st_size)})"
    if _looks_like_file(source):
        return f"file {path.name} (missing)"
    name, config, split = parse_dataset_spec(source)
    return f"datasets {name}" + (f" {config}" if config else "") + f" split {split}"


def load_calibration_text(source: str) -> list[str]:
    """Non-empty documents from a local file or a ``datasets`` spec (see the module docstring)."""
    if source == "self":
        raise CalibrationError("'self' is not a text source; it samples the model: generate_self_calibration")
    if source == BUILTIN:
        texts = _read_file(BUILTIN_TEXT)
    elif _looks_like_file(source):
        texts = _read_file(Path(source).expanduser())
    else:
        texts = _read_dataset(source)
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise CalibrationError(f"calibration source {source} contains no text; give it some text")
    return texts


def _looks_like_file(source: str) -> bool:
    # Anything that exists, has a known suffix or is written like a path is a file; a missing
    # "data.csv" must say "not found" rather than be sent to the Hub as a dataset name.
    path = Path(source).expanduser()
    if path.exists() or path.suffix.lower() in FILE_SUFFIXES:
        return True
    if source.startswith(("/", "./", "../", "~", ".\\")):
        return True
    return bool(re.fullmatch(r"\.[A-Za-z]{1,8}", Path(source.split(":")[0]).suffix))


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _read_file(path: Path) -> list[str]:
    if path.is_dir():
        raise CalibrationError(f"{path} is a folder; pass a {'/'.join(FILE_SUFFIXES)} calibration file")
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} not found; check the path or pass a datasets name")
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise CalibrationError(
            f"unknown calibration file type {suffix or '(none)'!r} for {path.name}; "
            f"use {', '.join(FILE_SUFFIXES)}"
        )
    if suffix == ".parquet":
        return _read_parquet(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    if suffix == ".txt":
        return [text]
    return _read_json(path, text, lines=suffix == ".jsonl")


def _read_json(path: Path, text: str, lines: bool) -> list[str]:
    if not lines:
        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError:
            # datasets' "json" loader accepts JSON lines in a .json file; so do we.
            return _read_json(path, text, lines=True)
        rows = data if isinstance(data, list) else [data]
        return [_text_of(row, path, i + 1) for i, row in enumerate(rows)]
    texts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            message = f"{path.name} line {number} is not valid JSON ({exc.msg}); fix or remove it"
            raise CalibrationError(message) from None
        texts.append(_text_of(row, path, number))
    return texts


def _text_of(row: Any, path: Path, number: int) -> str:
    if row is None or isinstance(row, str):
        return row or ""
    if isinstance(row, dict):
        if "text" in row and (row["text"] is None or isinstance(row["text"], str)):
            return row["text"] or ""
        strings = [key for key, value in row.items() if isinstance(value, str)]
        if len(strings) == 1:
            return row[strings[0]]
        raise CalibrationError(
            f"{path.name} row {number} has no 'text' field and {len(strings)} string fields "
            f"({', '.join(strings) or 'none'}); add a 'text' field"
        )
    raise CalibrationError(f"{path.name} row {number} is a {type(row).__name__}; use strings or objects")


def _read_parquet(path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise CalibrationError(f"{path.name} is not a readable parquet file ({exc}); re-export it") from None
    column = _pick_text_column(
        [f.name for f in schema],
        [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)],
        path.name,
    )
    return [t or "" for t in pq.read_table(path, columns=[column]).column(column).to_pylist()]


def _pick_text_column(columns: list[str], string_columns: list[str], where: str) -> str:
    if "text" in columns:
        return "text"
    if len(string_columns) == 1:
        return string_columns[0]
    raise CalibrationError(
        f"{where} has no 'text' column and {len(string_columns)} string columns "
        f"({', '.join(string_columns) or 'none'}); add a 'text' column"
    )


# ----------------------------------------------------------------------------------------------------
# datasets specs


def parse_dataset_spec(spec: str) -> tuple[str, str | None, str]:
    """``name[:config][:split]`` -> (name, config, split). A split may carry a slice (``train[:1000]``);
    with two parts the second is a split when it looks like one (``c4:validation``), else a config."""
    head, bracket, rest = spec.partition("[")
    parts = head.split(":")
    parts[-1] += bracket + rest
    if len(parts) > 3 or not parts[0]:
        raise CalibrationError(f"bad datasets spec {spec!r}; use name[:config][:split], "
                               "e.g. wikitext:wikitext-2-raw-v1")
    if len(parts) == 2 and _looks_like_split(parts[1]):
        parts.insert(1, "")
    name, config, split = (parts + ["", ""])[:3]
    return name, config or None, split or "train"


def _looks_like_split(part: str) -> bool:
    return "[" in part or part in SPLIT_NAMES


def _read_dataset(spec: str) -> list[str]:
    name, config, split = parse_dataset_spec(spec)
    try:
        import datasets
    except ImportError:
        raise CalibrationError(f"loading {spec!r} needs the datasets package (pip install datasets); "
                               f"or {LOCAL_HINT}") from None
    if not _hub_offline() and not hub_reachable():
        raise CalibrationError(f"cannot reach the Hugging Face Hub to load dataset {spec!r}; {OFFLINE_HINT} "
                               "(or set HF_HUB_OFFLINE=1 to use a cached copy)")
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; all mean "cannot load it"
        raise CalibrationError(_load_failure(spec, exc)) from None
    string_columns = [c for c, f in ds.features.items()
                      if getattr(f, "dtype", None) in ("string", "large_string")]
    column = _pick_text_column(list(ds.column_names), string_columns, f"dataset {spec!r}")
    texts = [t or "" for t in ds[column]]
    if name.split("/")[-1] in LINE_DATASETS:
        # Rows already end with "\n"; joining restores the raw articles (EOS per line would be noise).
        return ["".join(texts)]
    return texts


def _load_failure(spec: str, exc: Exception) -> str:
    detail = (str(exc).strip().splitlines() or [""])[0][:200]
    if _hub_offline():
        return (f"cannot load dataset {spec!r} with Hugging Face offline mode on ({type(exc).__name__}: {detail}); "
                f"{OFFLINE_HINT}")
    return f"cannot load dataset {spec!r} ({type(exc).__name__}: {detail}); {LOCAL_HINT}"


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the Hub endpoint (HF_ENDPOINT, proxies from the environment) answers one request in `timeout`
    seconds. Any HTTP answer counts; only a failed connection or a timeout does not."""
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):  # URLError, refused, timeout, DNS; ValueError: a malformed HF_ENDPOINT
        return False
    return True


def _hub_offline() -> bool:
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f.strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags)


# ----------------------------------------------------------------------------------------------------
# Token windows


def calibration_ids(source: str, tokenizer, nsamples: int, seqlen: int, seed: int, model_dir=None,
                    device: str = "cpu", quiet: bool = True) -> torch.Tensor:
    """(nsamples, seqlen) ids from any ``--calib`` value: a text source, ``self`` or ``random`` (both need
    ``model_dir``) or a mixture of them, concatenated in the order written. `tokenizer` None: loaded from
    ``model_dir`` when a part needs one (``random`` does not: tokenizer-less checkpoints work)."""
    _check_sizes(nsamples, seqlen)
    parts = split_sources(source)
    pieces = []
    for part, share in zip(parts, mixture_shares(nsamples, len(parts)), strict=True):
        if part in ("self", RANDOM) and model_dir is None:
            raise CalibrationError(f"--calib {part} needs the model folder")
        if part == RANDOM:
            pieces.append(random_ids(share, seqlen, seed, _vocab_size(model_dir)))
            continue
        if tokenizer is None:
            from .loading import load_tokenizer

            tokenizer = load_tokenizer(model_dir)
        if part == "self":
            sampling = SelfSampling(device=device, quiet=quiet)
            pieces.append(generate_self_calibration(model_dir, tokenizer, share, seqlen, seed, sampling))
        else:
            pieces.append(load_calibration(part, tokenizer, share, seqlen, seed))
    return torch.cat(pieces)


def random_ids(nsamples: int, seqlen: int, seed: int, vocab_size: int) -> torch.Tensor:
    """Uniform random ids (``--calib random``): the same cost as text, for benchmarks without a tokenizer."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (nsamples, seqlen), generator=gen)


def _vocab_size(model_dir) -> int:
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    return int(config.get("vocab_size") or config.get("text_config", {})["vocab_size"])


def load_calibration(source: str, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Token ids (nsamples, seqlen) from a file or datasets spec; sizes are checked before any loading."""
    _check_sizes(nsamples, seqlen)
    return build_calibration_ids(load_calibration_text(source), tokenizer, nsamples, seqlen, seed)


def build_calibration_ids(texts: list[str], tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """(nsamples, seqlen) int64 ids: random (possibly overlapping) windows of the EOS-joined documents,
    each led by BOS when the tokenizer adds BOS itself. Deterministic for a seed."""
    _check_sizes(nsamples, seqlen)
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    body = seqlen - 1 if bos is not None else seqlen
    stream = token_stream(texts, tokenizer)
    if len(stream) < body:
        lead = " after BOS" if bos is not None else ""
        raise CalibrationError(
            f"calibration text has {len(stream)} tokens, but a window of --seqlen {seqlen} "
            f"needs {body}{lead}; "
            "use more text or a smaller --seqlen"
        )
    if len(stream) < nsamples * body:
        log.warning("calibration text has %d tokens, fewer than %d disjoint windows of %d: windows overlap",
                    len(stream), nsamples, body)
    rng = random.Random(seed)
    starts = [rng.randint(0, len(stream) - body) for _ in range(nsamples)]
    windows = torch.stack([stream[s : s + body] for s in starts])
    if bos is not None:
        windows = torch.cat([torch.full((nsamples, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


def token_stream(texts: Iterable[str], tokenizer) -> torch.Tensor:
    """1-D int64 ids of all documents, EOS between documents, no special tokens otherwise."""
    eos = tokenizer.eos_token_id
    sep = np.array([eos] if eos is not None else [], dtype=np.int64)
    pieces: list[np.ndarray] = []
    for batch in _batches(list(texts), _TOKENIZE_BATCH):
        # verbose=False: a long document is expected here, not a model_max_length mistake.
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            if ids:
                if pieces:
                    pieces.append(sep)
                pieces.append(np.asarray(ids, dtype=np.int64))
    return torch.from_numpy(np.concatenate(pieces)) if pieces else torch.zeros(0, dtype=torch.long)


def _batches(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer prepends BOS on a plain encode. Probing beats the ``add_bos_token`` flag,
    which many fast tokenizers leave False while their post-processor adds BOS anyway."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def _check_sizes(nsamples: int, seqlen: int) -> None:
    problem = option_problem("nsamples", nsamples) or option_problem("seqlen", seqlen)
    if problem:
        raise CalibrationError(problem)


# ----------------------------------------------------------------------------------------------------
# Self-generated calibration ("--calib self")


@dataclass(frozen=True)
class SelfSampling:
    """How ``--calib self`` draws its samples (the what: nsamples, seqlen, seed, are the function's arguments).
    `batch_size` changes the order of the random draws, so the ids are deterministic for (seed, batch_size)."""

    device: str = "cpu"
    temperature: float = 1.0
    batch_size: int | None = None  # samples decoded at once; None: all of them
    quiet: bool = True  # no progress bar over the decoding steps


def generate_self_calibration(model_dir, tokenizer, nsamples: int, seqlen: int, seed: int,
                              sampling: SelfSampling = SelfSampling()) -> torch.Tensor:
    """(nsamples, seqlen) int64 ids sampled from the model itself (data-free, LLM-QAT style).

    Each sample starts with BOS when the tokenizer adds BOS (as text windows do), else with a random
    non-special token; the rest is sampled token by token with a KV cache. By default all samples form
    one batch, so the seqlen - 1 decoding steps each run one token for every sample at once: about the
    cost of one dense forward over the calibration set (a step is bound by reading the weights, which
    a larger batch shares). Sampling runs on a seeded CPU generator, so the result is deterministic for
    (seed, batch_size) and does not depend on device RNGs. BOS and other special tokens except EOS are
    never sampled, nor ids beyond the tokenizer (padding rows of the embedding). Loads the whole model:
    only for models that fit in memory.
    """
    _check_sizes(nsamples, seqlen)
    temperature = sampling.temperature
    if not temperature > 0:
        raise CalibrationError(f"sampling temperature must be > 0, got {temperature}")
    batch_size = nsamples if sampling.batch_size is None else max(1, sampling.batch_size)
    model = _load_model(model_dir, sampling.device)
    vocab = min(len(tokenizer), model.get_output_embeddings().weight.shape[0])
    banned = _banned_ids(tokenizer, vocab)
    generator = torch.Generator().manual_seed(seed)
    first = _first_tokens(tokenizer, nsamples, vocab, banned, generator)
    batches = range(0, nsamples, batch_size)
    bar = tqdm(total=len(batches) * (seqlen - 1), desc="calibration (sampling from the model)", unit="step",
               disable=sampling.quiet)
    out = []
    with bar:
        for start in batches:
            out.append(_sample_batch(model, first[start : start + batch_size], seqlen, vocab, banned,
                                     temperature, generator, bar.update))
            log.info("self-calibration: %d/%d samples", min(start + batch_size, nsamples), nsamples)
    del model
    return torch.cat(out)


def _load_model(model_dir, device: str):
    from transformers import AutoModelForCausalLM

    from .devices import resolve_device

    device = resolve_device(device)
    _check_model_fits(model_dir, device)
    # float32 on CPU (half-precision matmuls there are slow); the checkpoint's own dtype elsewhere.
    dtype = torch.float32 if device.type == "cpu" else "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    except (OSError, ValueError) as exc:
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CalibrationError(f"cannot load the model from {model_dir} for --calib self ({detail}); "
                               f"use a text source instead") from None
    return model.to(device).eval()


def _check_model_fits(model_dir, device: torch.device, headroom: float = 0.9) -> None:
    """Refuse in one line, before loading, a model that would not fit: 'self' is the one place where streamprune
    holds a whole model, and an out-of-memory kill halfway through loading says nothing useful."""
    from .checkpoint import CheckpointReader
    from .devices import free_memory_bytes

    try:
        reader = CheckpointReader(model_dir)
    except (OSError, StreamPruneError):
        return  # not a readable safetensors folder: the loader below gives its own error
    itemsize = 4 if device.type == "cpu" else reader.storage_dtype().itemsize
    needed, free = reader.parameter_count() * itemsize, free_memory_bytes(device)
    if needed > headroom * free:
        raise CalibrationError(f"--calib self loads the whole model ({needed / 1e9:.1f} GB on {device}), but only "
                               f"{free / 1e9:.1f} GB is free there; use a text source (pruning itself streams "
                               f"one layer at a time)")


def _banned_ids(tokenizer, vocab: int) -> torch.Tensor:
    special = set(tokenizer.all_special_ids) - {tokenizer.eos_token_id}
    return torch.tensor(sorted(i for i in special if 0 <= i < vocab), dtype=torch.long)


def _first_tokens(tokenizer, nsamples: int, vocab: int, banned: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
    if adds_bos(tokenizer):
        return torch.full((nsamples,), tokenizer.bos_token_id, dtype=torch.long)
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[banned] = False
    allowed[[i for i in (tokenizer.eos_token_id,) if i is not None and i < vocab]] = False
    candidates = allowed.nonzero().squeeze(1)
    return candidates[torch.randint(len(candidates), (nsamples,), generator=generator)]


@torch.inference_mode()
def _sample_batch(model, first: torch.Tensor, seqlen: int, vocab: int, banned: torch.Tensor,
                  temperature: float, generator: torch.Generator, on_step=lambda n: None) -> torch.Tensor:
    device = next(model.parameters()).device
    # transformers renamed the KV cache argument and output (past_key_values -> cache) within 5.x.
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    tokens = [first]
    step, past = first[:, None], None
    for _ in range(seqlen - 1):
        res = model(input_ids=step.to(device), use_cache=True, **{key: past})
        past = getattr(res, key)
        logits = res.logits[:, -1, :vocab].float().cpu() / temperature
        logits[:, banned] = float("-inf")
        step = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        tokens.append(step[:, 0])
        on_step(1)
    return torch.stack(tokens, dim=1)
