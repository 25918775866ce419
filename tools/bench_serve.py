"""Serving speed of dense vs pruned models: llama.cpp (GGUF, via llama-cpp-python) and transformers on CPU.

For every model folder and every GGUF weight type it exports the model (`streamprune export`, kept in
--gguf-dir and reused) and measures in llama.cpp, the way llama-bench does:

- prompt processing: one 512-token batch into an empty KV cache (pp512), tokens/s;
- decode: 128 tokens generated one at a time from an empty cache (tg128), tokens/s;

each --reps times after one warm-up, reporting the median and the best (fastest) repetition. Then
transformers' decode on CPU (float32, KV cache, 128 single-token steps after a 16-token prompt).

The ceiling of the decode speed-up is dense file bytes / pruned file bytes: decoding one token reads
every weight once (the tied SmolLM2 embedding doubles as the output matrix), so it is memory-bound.

    flock -x /tmp/sp-timing.lock python tools/bench_serve.py --dense MODELS/dense \\
        --pruned p20=OUT/p20 --pruned p50=OUT/p50 --threads 2 --json docs/serving.json
"""

from __future__ import annotations

import inspect
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, cwd=ROOT).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def summary(seconds: list[float], tokens: int) -> dict:
    """Tokens/s at the median and at the fastest repetition, plus the raw times."""
    return {"median_tps": tokens / statistics.median(seconds), "best_tps": tokens / min(seconds),
            "seconds": [round(s, 5) for s in seconds]}


def prompt_ids(n_vocab: int, n: int, seed: int = 0) -> list[int]:
    # Any ids do for speed (llama-bench uses random ones too); a fixed seed keeps runs comparable.
    return np.random.default_rng(seed).integers(10, n_vocab, size=n).tolist()


def llama_cpp_speed(gguf_path: Path, threads: int, reps: int, pp: int, tg: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=pp + tg + 8, n_batch=pp, n_ubatch=pp, n_threads=threads,
                n_threads_batch=threads, logits_all=False, verbose=False)
    ids = prompt_ids(llm.n_vocab(), pp)
    decode_ids = prompt_ids(llm.n_vocab(), tg, seed=1)

    def prompt_once() -> float:
        llm.reset()
        started = time.perf_counter()
        llm.eval(ids)
        return time.perf_counter() - started

    def decode_once() -> float:
        llm.reset()
        started = time.perf_counter()
        for token in decode_ids:  # one llama_decode per token, as generation does
            llm.eval([token])
        return time.perf_counter() - started

    prompt_once(), decode_once()  # warm-up: page in the weights, size the buffers
    pp_s = [prompt_once() for _ in range(reps)]
    tg_s = [decode_once() for _ in range(reps)]
    return {"pp": summary(pp_s, pp), "tg": summary(tg_s, tg)}


def transformers_decode_speed(model_dir: str, threads: int, reps: int, tg: int) -> dict:
    import torch

    from streamprune.loading import load_pruned

    torch.set_num_threads(threads)
    model = load_pruned(model_dir, dtype=torch.float32)
    prompt = torch.tensor([prompt_ids(model.config.vocab_size, 16)])
    steps = torch.tensor(prompt_ids(model.config.vocab_size, tg, seed=1)).view(-1, 1, 1)

    # transformers renamed the KV cache argument and output (past_key_values -> cache) within 5.x.
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @torch.inference_mode()
    def decode_once() -> float:
        past = getattr(model(prompt, use_cache=True), key)
        started = time.perf_counter()
        for token in steps:
            past = getattr(model(token, use_cache=True, **{key: past}), key)
        return time.perf_counter() - started

    decode_once()
    return {"tg": summary([decode_once() for _ in range(reps)], tg)}


def export(model_dir: str, out: Path, outtype: str) -> Path:
    from streamprune.export_gguf import export_gguf

    if not out.is_file():
        export_gguf(model_dir, out, outtype)
    return out


def layer_bytes(gguf_path: Path) -> dict:
    """Bytes of the decoder layers and of the embedding / output matrices (what pruning cannot shrink)."""
    from gguf import GGUFReader

    totals = {"layers": 0, "embedding_and_output": 0, "other": 0}
    for t in GGUFReader(gguf_path).tensors:
        kind = "layers" if t.name.startswith("blk.") else (
            "embedding_and_output" if t.name in ("token_embd.weight", "output.weight") else "other")
        totals[kind] += int(t.n_bytes)
    return totals


@click.command()
@click.option("--dense", "dense_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--pruned", "pruned", multiple=True, required=True, help="NAME=FOLDER, repeatable.")
@click.option("--outtypes", default="f16,q8_0", show_default=True)
@click.option("--gguf-dir", default=None, type=click.Path(file_okay=False),
              help="Where the GGUF files are written and reused [default: a folder next to --json].")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--reps", type=int, default=5, show_default=True)
@click.option("--prompt-tokens", "pp", type=int, default=512, show_default=True)
@click.option("--decode-tokens", "tg", type=int, default=128, show_default=True)
@click.option("--skip-transformers", is_flag=True)
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False))
def main(dense_dir: str, pruned: tuple[str, ...], outtypes: str, gguf_dir: str | None, threads: int, reps: int,
         pp: int, tg: int, skip_transformers: bool, json_path: str | None) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    load_before = os.getloadavg()  # other work on the machine shows here
    models = {"dense": dense_dir, **dict(p.split("=", 1) for p in pruned)}
    gguf_root = Path(gguf_dir or Path(json_path or "bench-serve.json").with_suffix(".gguf.d"))
    gguf_root.mkdir(parents=True, exist_ok=True)
    rows = []
    for outtype in outtypes.split(","):
        for name, folder in models.items():
            path = export(folder, gguf_root / f"{name}-{outtype}.gguf", outtype)
            row = {"model": name, "folder": folder, "engine": "llama.cpp", "outtype": outtype,
                   "file_bytes": path.stat().st_size, **layer_bytes(path),
                   **llama_cpp_speed(path, threads, reps, pp, tg)}
            rows.append(row)
            click.echo(f"{name:8s} {outtype:5s} {row['file_bytes'] / 1e6:8.1f} MB  pp{pp} "
                       f"{row['pp']['median_tps']:8.1f} t/s  tg{tg} {row['tg']['median_tps']:7.1f} t/s", err=True)
    if not skip_transformers:
        for name, folder in models.items():
            row = {"model": name, "folder": folder, "engine": "transformers", "outtype": "float32",
                   **transformers_decode_speed(folder, threads, reps, tg)}
            rows.append(row)
            click.echo(f"{name:8s} torch f32 tg{tg} {row['tg']['median_tps']:7.1f} t/s", err=True)
    result = {"commit": git_commit(), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "threads": threads, "reps": reps, "prompt_tokens": pp, "decode_tokens": tg,
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "rows": rows, "speedups": speedups(rows), "decode_cost": decode_cost_fits(rows)}
    text = json.dumps(result, indent=2)
    if json_path:
        Path(json_path).write_text(text + "\n")
    click.echo(markdown(result))


def speedups(rows: list[dict]) -> list[dict]:
    """Pruned vs dense of the same engine and weight type: measured decode speed-up against its ceiling."""
    out = []
    dense = {(r["engine"], r["outtype"]): r for r in rows if r["model"] == "dense"}
    for r in rows:
        base = dense.get((r["engine"], r["outtype"]))
        if r["model"] == "dense" or base is None:
            continue
        item = {"model": r["model"], "engine": r["engine"], "outtype": r["outtype"],
                "decode_speedup": r["tg"]["median_tps"] / base["tg"]["median_tps"]}
        if "file_bytes" in r:
            ceiling = base["file_bytes"] / r["file_bytes"]
            item.update(prompt_speedup=r["pp"]["median_tps"] / base["pp"]["median_tps"], ceiling=ceiling,
                        share_of_ceiling=(item["decode_speedup"] - 1) / (ceiling - 1) if ceiling > 1 else None,
                        ratio_to_ceiling=item["decode_speedup"] / ceiling)
        out.append(item)
    return out


def decode_cost_fits(rows: list[dict]) -> list[dict]:
    """Per weight type, the least-squares line seconds/token = fixed + file bytes / bandwidth.

    A memory-bound decode has fixed ~ 0, and then speed-up = bytes ratio. Whatever does not shrink with
    the weights (one llama_decode call, graph build and per-op dispatch for every layer, the KV-cache
    attention, the Python binding) shows up as `fixed`; with it the reachable speed-up is
    (fixed + dense bytes / bandwidth) / (fixed + pruned bytes / bandwidth), which is `ceiling_with_fixed`.
    """
    fits = []
    for outtype in sorted({r["outtype"] for r in rows if "file_bytes" in r}):
        points = [r for r in rows if r.get("outtype") == outtype and "file_bytes" in r]
        if len(points) < 2:
            continue
        x = np.array([r["file_bytes"] for r in points], dtype=float)
        y = np.array([1.0 / r["tg"]["median_tps"] for r in points])
        slope, fixed = np.polyfit(x, y, 1)
        predicted = fixed + slope * x
        dense = next((r for r in points if r["model"] == "dense"), None)
        item = {"outtype": outtype, "fixed_ms_per_token": fixed * 1e3,
                "bandwidth_gb_s": 1e-9 / slope if slope > 0 else None,
                "max_residual": float(np.max(np.abs(predicted - y) / y)), "models": {}}
        for r in points:
            if dense is not None and r is not dense:
                reachable = (fixed + slope * dense["file_bytes"]) / (fixed + slope * r["file_bytes"])
                measured = r["tg"]["median_tps"] / dense["tg"]["median_tps"]
                item["models"][r["model"]] = {"ceiling_with_fixed": reachable, "measured": measured}
        fits.append(item)
    return fits


def markdown(result: dict) -> str:
    pp, tg = result["prompt_tokens"], result["decode_tokens"]
    lines = [f"| model | engine | weights | file MB | pp{pp} t/s median (best) | tg{tg} t/s median (best) |",
             "|---|---|---|---:|---:|---:|"]
    for r in result["rows"]:
        size = f"{r['file_bytes'] / 1e6:.1f}" if "file_bytes" in r else "-"
        prompt = f"{r['pp']['median_tps']:.1f} ({r['pp']['best_tps']:.1f})" if "pp" in r else "-"
        lines.append(f"| {r['model']} | {r['engine']} | {r['outtype']} | {size} | {prompt} | "
                     f"{r['tg']['median_tps']:.1f} ({r['tg']['best_tps']:.1f}) |")
    lines += ["", "| model | engine | weights | decode speed-up | ceiling (bytes) | speed-up / ceiling |",
              "|---|---|---|---:|---:|---:|"]
    for s in result["speedups"]:
        ceiling = f"{s['ceiling']:.3f}" if "ceiling" in s else "-"
        ratio = f"{s['ratio_to_ceiling']:.1%}" if "ceiling" in s else "-"
        lines.append(f"| {s['model']} | {s['engine']} | {s['outtype']} | {s['decode_speedup']:.3f} | {ceiling} | "
                     f"{ratio} |")
    for fit in result.get("decode_cost", []):
        reachable = ", ".join(f"{m} {v['ceiling_with_fixed']:.3f} (measured {v['measured']:.3f})"
                              for m, v in fit["models"].items())
        lines += ["", f"{fit['outtype']}: seconds per decoded token = {fit['fixed_ms_per_token']:.2f} ms + "
                  f"file bytes / {fit['bandwidth_gb_s'] or float('nan'):.1f} GB/s (largest residual "
                  f"{fit['max_residual']:.1%}); speed-up reachable with that fixed cost: {reachable}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
