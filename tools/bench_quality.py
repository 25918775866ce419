"""Quality of pruned SmolLM2-135M-Instruct: perplexity, KL and top-1 agreement vs the dense model.

Calibration text is the first `--calib-fraction` of a text file (default: WikiText-2 validation from
../shared/data), evaluation text a disjoint slice after it; perplexity uses consecutive 128-token
windows (the LLM-Pruner / SlimLLM protocol). Every variant is pruned with the streaming engine and
evaluated layer by layer against the dense model.

    python tools/bench_quality.py --ratios 0.2 0.5 --json docs/quality.json > docs/quality.md

Variants: the full method, each ablation (no greedy search, no feature space, uniform ratios, no
regression), whole-KV-group pruning, and calibration sampled from the model itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import click

import streamprune
from streamprune.evaluation import evaluate, text_windows
from streamprune.gguf_convert import default_cache_dir, demo_model_dir
from streamprune.loading import load_tokenizer

VARIANTS = {
    "full": {},
    "no greedy": {"greedy": False},
    "no feature space": {"feature_space": False},
    "uniform": {"uniform": True},
    "no regression": {"regression": False},
    "kv groups": {"gqa_mode": "groups"},
    "self calibration": {"calib": "self"},
}
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-valid.tokens.txt"


def split_text(path: Path, calib_fraction: float, workdir: Path) -> tuple[Path, str]:
    """Calibration file = the first fraction (cut at a line break); evaluation = everything after."""
    text = path.read_text(encoding="utf-8")
    cut = text.index("\n", int(len(text) * calib_fraction))
    calib = workdir / "calib.txt"
    calib.write_text(text[:cut])
    return calib, text[cut + 1:]


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=Path(__file__).parent).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@click.command()
@click.option("--model-dir", type=click.Path(path_type=Path), default=None,
              help="Dense model [default: the demo's SmolLM2-135M-Instruct, converted into the cache].")
@click.option("--text", "text_path", type=click.Path(path_type=Path), default=DEFAULT_TEXT, show_default=True)
@click.option("--calib-fraction", type=float, default=0.3, show_default=True)
@click.option("--ratios", type=float, multiple=True, default=(0.2, 0.5), show_default=True)
@click.option("--variants", multiple=True, default=tuple(VARIANTS), show_default=True)
@click.option("--self-calib-ratios", type=float, multiple=True, default=(0.2,), show_default=True,
              help="Ratios at which the self-calibration variant runs (it regenerates text each time).")
@click.option("--nsamples", type=int, default=32, show_default=True)
@click.option("--seqlen", type=int, default=128, show_default=True)
@click.option("--max-windows", type=int, default=160, show_default=True, help="Evaluation windows of 128 tokens.")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("/tmp/streamprune-quality"))
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def main(model_dir, text_path, calib_fraction, ratios, variants, self_calib_ratios, nsamples, seqlen,
         max_windows, workdir, json_path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = model_dir or demo_model_dir(default_cache_dir())
    calib, eval_text = split_text(text_path, calib_fraction, workdir)
    windows = text_windows(eval_text, load_tokenizer(model_dir), 128, max_windows)
    dense = evaluate(model_dir, windows)
    rows = [{"ratio": 0.0, "variant": "dense", "perplexity": dense.perplexity, "kl": 0.0, "top1": 1.0,
             "params": streamprune.engine.CheckpointReader(model_dir).parameter_count(), "prune_seconds": 0.0}]
    click.echo(f"dense perplexity {dense.perplexity:.2f} on {dense.tokens} predicted tokens", err=True)
    for ratio in ratios:
        for name in variants:
            if name == "self calibration" and ratio not in self_calib_ratios:
                continue
            rows.append(run_variant(model_dir, calib, windows, ratio, name, nsamples, seqlen, workdir))
            click.echo(json.dumps(rows[-1]), err=True)
    command = "python tools/bench_quality.py " + " ".join(sys.argv[1:])
    click.echo(markdown(rows, windows.shape[0], command))
    if json_path:
        json_path.write_text(json.dumps({"commit": git_commit(), "command": command, "rows": rows}, indent=2))


def run_variant(model_dir, calib, windows, ratio, name, nsamples, seqlen, workdir) -> dict:
    options = {"calib": str(calib), "nsamples": nsamples, "seqlen": seqlen, **VARIANTS[name]}
    out = workdir / f"pruned-{round(ratio * 100)}-{name.replace(' ', '-')}"
    start = time.perf_counter()
    report = streamprune.prune(model_dir, out, ratio, overwrite=True, restart=True, quiet=True, **options).report
    seconds = time.perf_counter() - start
    result = evaluate(out, windows, reference_dir=model_dir)
    return {"ratio": ratio, "variant": name, "perplexity": result.perplexity, "kl": result.kl_from_reference,
            "top1": result.top1_agreement, "params": report["params_after"],
            "achieved_ratio": report["achieved_ratio"], "prune_seconds": seconds}


def markdown(rows: list[dict], n_windows: int, command: str) -> str:
    lines = [f"Commit {git_commit()}; `{command}`; evaluation on {n_windows} windows of 128 tokens.", "",
             "| ratio | variant | parameters | achieved | perplexity | KL vs dense | top-1 agreement | prune s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['ratio']:.0%} | {r['variant']} | {r['params']:,} | {r.get('achieved_ratio', 0):.2%} | "
                     f"{r['perplexity']:.2f} | {r['kl']:.3f} | {r['top1']:.1%} | {r['prune_seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
