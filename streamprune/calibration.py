"""Calibration data: text sources to (nsamples, seqlen) token ids, or samples from the model itself."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch


class CalibrationError(ValueError):
    """A calibration source problem, phrased as what is wrong and what to do."""


def describe_source(source: str) -> str:
    path = Path(source)
    if path.is_file():
        return f"file {path.name} ({path.stat().st_size / 1e6:.1f} MB)"
    return "self-generated" if source == "self" else f"dataset {source}"


def load_calibration_text(source: str) -> list[str]:
    """Documents from a .txt / .jsonl / .json / .parquet file or a datasets spec 'name[:config][:split]'."""
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in (".txt", ".jsonl", ".json", ".parquet") or path.exists():
        if not path.is_file():
            raise CalibrationError(f"calibration file {source} not found")
        texts = _read_file(path, suffix)
    else:
        texts = _read_dataset(source)
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise CalibrationError(f"calibration source {source} is empty")
    return texts


def _read_file(path: Path, suffix: str) -> list[str]:
    if suffix == ".txt":
        return [path.read_text(encoding="utf-8", errors="replace")]
    if suffix == ".jsonl":
        return [_text_of(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    if suffix == ".json":
        data = json.loads(path.read_text())
        return [_text_of(row) for row in (data if isinstance(data, list) else [data])]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise CalibrationError(f"{path} has no 'text' column")
        return [str(t) for t in table.column("text").to_pylist()]
    raise CalibrationError(f"unknown calibration file type {suffix!r}; use .txt, .jsonl, .json or .parquet")


def _text_of(row) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        if isinstance(row.get("text"), str):
            return row["text"]
        strings = [v for v in row.values() if isinstance(v, str)]
        if len(strings) == 1:
            return strings[0]
    raise CalibrationError("calibration JSON rows need a 'text' field")


def _read_dataset(spec: str) -> list[str]:
    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        from datasets import load_dataset

        ds = load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; all mean "cannot load"
        raise CalibrationError(
            f"cannot load dataset {spec!r} ({type(exc).__name__}); offline? pass a local .txt/.jsonl file"
        ) from None
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return [str(t) for t in ds[column]]


def build_calibration_ids(texts: list[str], tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Random windows of `seqlen` tokens (overlap allowed, as in SlimLLM / LLM-Pruner) from the
    documents joined with EOS; windows start at random offsets drawn with random.Random(seed)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids.append(eos)
    if len(ids) < seqlen + 1:
        raise CalibrationError(
            f"calibration text has {len(ids)} tokens, but {seqlen + 1} are needed for windows of {seqlen}; "
            "use more text or a smaller --seqlen"
        )
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - seqlen) for _ in range(nsamples)]
    return torch.tensor([ids[s : s + seqlen] for s in starts], dtype=torch.long)


def load_calibration(source: str, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    if nsamples < 1:
        raise CalibrationError(f"--nsamples must be at least 1, got {nsamples}")
    if seqlen < 2:
        raise CalibrationError(f"--seqlen must be at least 2, got {seqlen}")
    return build_calibration_ids(load_calibration_text(source), tokenizer, nsamples, seqlen, seed)


def generate_self_calibration(model_dir, tokenizer, nsamples: int, seqlen: int, seed: int,
                              device: str = "cpu", temperature: float = 1.0) -> torch.Tensor:
    """Sample calibration sequences from the model itself, starting from BOS (loads the whole model)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device).eval()
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0
    generator = torch.Generator(device=device).manual_seed(seed)
    out = torch.full((nsamples, 1), start, dtype=torch.long, device=device)
    past = None
    with torch.no_grad():
        step_input = out
        for _ in range(seqlen - 1):
            res = model(step_input, past_key_values=past, use_cache=True)
            past = res.past_key_values
            probs = torch.softmax(res.logits[:, -1].float() / temperature, dim=-1)
            step_input = torch.multinomial(probs, 1, generator=generator)
            out = torch.cat([out, step_input], dim=1)
    return out.cpu()
