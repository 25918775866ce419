"""Held-out quality of pruned SmolLM2-135M-Instruct: perplexity ratio, KL and top-1 agreement vs dense.

The protocol keeps calibration and evaluation apart by *source*, not by slicing one file:
- calibration: one text file (default WikiText-2 validation from ../shared/data, encyclopaedic prose);
- evaluation: every `*.txt` in `--eval-dir`, each a different source and kind (see tools/eval_texts.py:
  a 1909 novel, 2006 science news, GSM8K question/answer text), none of it used for calibration.
  WikiText-2 test and PTB test are deliberately not used here: they stay for independent checks.
Each variant is pruned with the streaming engine once per calibration seed (the seed picks which
windows of the calibration file are drawn), then evaluated layer by layer against the dense model on
the first `--max-windows` consecutive 128-token windows of each source.

    python tools/eval_texts.py --out ~/.cache/streamprune/eval-texts      # once
    python tools/bench_quality.py --ratios "0.2 0.5" --variants "paper default" --seeds "0 1 2" \
        --json docs/quality.json > docs/quality.md

The markdown gives, per variant and source, the perplexity ratio pruned/dense (mean over seeds and
min-max), KL and top-1 agreement; the JSON keeps every (variant, ratio, seed, source) row.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click

import streamprune
from streamprune.demo.gguf_import import default_cache_dir, demo_model_dir
from streamprune.engine import PAPER_METHOD
from streamprune.evaluation import evaluate, final_hidden_states, text_windows
from streamprune.loading import load_tokenizer

# Named option sets passed to streamprune.prune. "paper" is SlimLLM as published; "default" is what
# `streamprune run` does with no method flags. Extend here to measure a new option.
VARIANTS: dict[str, dict] = {
    "default": {},
    "paper": PAPER_METHOD,
    "no recovery": {"regression": False},
    "no greedy": {"greedy": False},
    "no feature space": {"feature_space": False},
    "uniform": {"uniform": True},
    "kv groups": {"gqa_mode": "groups"},
}
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CALIB = ROOT.parent / "shared" / "data" / "wikitext2-valid.tokens.txt"
DEFAULT_EVAL_DIR = Path("~/.cache/streamprune/eval-texts").expanduser()


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, cwd=ROOT).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_variant(spec: str) -> tuple[str, dict]:
    """A name from VARIANTS, or `name:key=value,key=value` for an ad-hoc option set."""
    if ":" not in spec:
        if spec not in VARIANTS:
            raise click.ClickException(f"unknown variant {spec!r}; known: {', '.join(VARIANTS)} or name:key=value,...")
        return spec, VARIANTS[spec]
    name, _, pairs = spec.partition(":")
    options = {}
    for pair in pairs.split(","):
        key, _, value = pair.partition("=")
        options[key.strip()] = json.loads(value) if value.strip()[:1] in "0123456789-tfn[{\"" else value.strip()
    return name, options


@click.command()
@click.option("--model-dir", type=click.Path(path_type=Path), default=None,
              help="Dense model [default: the demo's SmolLM2-135M-Instruct, converted into the cache].")
@click.option("--calib", "calib_path", type=click.Path(path_type=Path), default=DEFAULT_CALIB, show_default=True)
@click.option("--eval-dir", type=click.Path(path_type=Path, exists=True), default=DEFAULT_EVAL_DIR,
              show_default=True, help="Folder of held-out *.txt sources (tools/eval_texts.py).")
@click.option("--ratios", default="0.2 0.5", show_default=True, help="Space-separated target ratios.")
@click.option("--variants", default="paper default", show_default=True,
              help="Space-separated names from VARIANTS, or name:key=value,... (prune() options).")
@click.option("--seeds", default="0 1 2", show_default=True, help="Space-separated calibration seeds.")
@click.option("--nsamples", type=int, default=None, help="Calibration sequences [default: the engine's].")
@click.option("--seqlen", type=int, default=None, help="Calibration sequence length [default: the engine's].")
@click.option("--max-windows", type=int, default=100, show_default=True, help="128-token windows per source.")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("/tmp/streamprune-quality"))
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def main(model_dir, calib_path, eval_dir, ratios, variants, seeds, nsamples, seqlen, max_windows, workdir,
         json_path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    ratios, variants, seeds = [float(r) for r in ratios.split()], variants.split(), [int(s) for s in seeds.split()]
    for spec in variants:  # fail on a misspelt variant before the dense evaluation, not after an hour
        parse_variant(spec)
    model_dir = model_dir or demo_model_dir(default_cache_dir())
    tokenizer = load_tokenizer(model_dir)
    sources = {p.stem: text_windows(p.read_text(encoding="utf-8"), tokenizer, 128, max_windows)
               for p in sorted(eval_dir.glob("*.txt"))}
    if not sources:
        raise click.ClickException(f"no *.txt sources in {eval_dir}: run tools/eval_texts.py first")
    dense_hidden = {name: final_hidden_states(model_dir, w) for name, w in sources.items()}
    dense = {name: evaluate(model_dir, w).perplexity for name, w in sources.items()}
    click.echo("dense perplexity: " + ", ".join(f"{k} {v:.2f}" for k, v in dense.items()), err=True)
    sizing = {k: v for k, v in (("nsamples", nsamples), ("seqlen", seqlen)) if v is not None}
    command = "python tools/bench_quality.py " + " ".join(sys.argv[1:])
    payload = {"commit": git_commit(), "command": command, "dense": dense, "calib": str(calib_path.name),
               "windows": {k: int(v.shape[0]) for k, v in sources.items()}, "rows": []}
    rows = payload["rows"]
    for ratio in ratios:
        for spec in variants:
            name, options = parse_variant(spec)
            for seed in seeds:
                rows += run_variant(model_dir, calib_path, sources, dense, dense_hidden, ratio, name,
                                    {**options, **sizing, "seed": seed}, workdir)
                if json_path:  # after every pruned model, so an interrupted run keeps what it measured
                    json_path.write_text(json.dumps(payload, indent=2))
    click.echo(markdown(rows, dense, sources, command))


def run_variant(model_dir, calib, sources, dense, dense_hidden, ratio, name, options, workdir) -> list[dict]:
    out = workdir / f"pruned-{round(ratio * 100)}-{name.replace(' ', '-')}-s{options['seed']}"
    start = time.perf_counter()
    report = streamprune.prune(model_dir, out, ratio, calib=str(calib), overwrite=True, restart=True, quiet=True,
                               **options).report
    seconds = time.perf_counter() - start
    rows = []
    for source, windows in sources.items():
        result = evaluate(out, windows, reference_dir=model_dir, reference_hidden=dense_hidden[source])
        rows.append({"ratio": ratio, "variant": name, "options": options, "seed": options["seed"], "source": source,
                     "perplexity": result.perplexity, "ppl_ratio": result.perplexity / dense[source],
                     "kl": result.kl_from_reference, "top1": result.top1_agreement,
                     "params": report["params_after"], "achieved_ratio": report["achieved_ratio"],
                     "prune_seconds": seconds})
        click.echo(json.dumps(rows[-1]), err=True)
    return rows


def _spread(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def _per_seed_means(group: list[dict], key: str) -> list[float]:
    """The mean over sources of `key`, one value per calibration seed."""
    seeds = sorted({r["seed"] for r in group})
    return [statistics.mean(r[key] for r in group if r["seed"] == s) for s in seeds]


def markdown(rows: list[dict], dense: dict, sources: dict, command: str) -> str:
    names = list(sources)
    lines = [f"Commit {git_commit()}; `{command}`.",
             "Dense perplexity: " + ", ".join(f"{k} {dense[k]:.2f} ({sources[k].shape[0]} windows)" for k in names)
             + ". Cells: mean over calibration seeds (min-max).", "",
             "| ratio | variant | achieved | " + " | ".join(f"{k} PPL ratio" for k in names)
             + " | mean PPL ratio | mean KL | mean top-1 | prune s |",
             "|---|---|---|" + "---|" * (len(names) + 4)]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["ratio"], r["variant"]), []).append(r)
    for (ratio, variant), group in groups.items():
        cells = [_spread([r["ppl_ratio"] for r in group if r["source"] == s], ".3f") for s in names]
        means = [_spread(_per_seed_means(group, key), ".3f") for key in ("ppl_ratio", "kl", "top1")]
        lines.append(f"| {ratio:.0%} | {variant} | {group[0]['achieved_ratio']:.2%} | " + " | ".join(cells + means)
                     + f" | {statistics.mean(r['prune_seconds'] for r in group):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
