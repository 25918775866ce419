"""Memory and speed of `streamprune run` on LLaMA-shaped random checkpoints (issue: 7B-70B scale).

For each layer count it generates a checkpoint with tools/make_checkpoint.py (once, cached in
--workdir), times a plain sequential read of its shards (the I/O floor), then runs the real CLI in a
subprocess and summarises its report: peak host RSS (and peak GPU memory on CUDA), per-layer time
split into read wait / build / forward / statistics / scoring / regression / write, and the ratio of
the method's extra work to one dense forward of the layer over the calibration set.

    python tools/bench_scale.py --preset llama2-7b --layers 4 --layers 32 --nsamples 8
    python tools/bench_scale.py --preset llama2-7b --layers 2 --compare-prefetch
    python tools/bench_scale.py --preset llama2-70b --layers 1 --vocab 32000

Results go to stdout as a Markdown table and, with --json, to a file. Numbers are only meaningful
for the machine they were measured on; docs/performance.md records the command with each table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_checkpoint import make_checkpoint  # noqa: E402

METHOD_PHASES = ("statistics", "pca", "scoring", "regression")
PASS2_PHASES = ("read", "build", "forward", "statistics", "pca", "scoring", "regression", "reconstruction", "write")


def drop_page_cache() -> bool:
    """Cold-cache reads need root and a writable /proc/sys; say whether it worked."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def sequential_read_seconds(folder: Path) -> tuple[float, int, bool]:
    """Time to read every shard front to back in 64 MiB blocks (no parsing): the disk floor."""
    cold = drop_page_cache()
    total, start = 0, time.perf_counter()
    for shard in sorted(folder.glob("*.safetensors")):
        with open(shard, "rb", buffering=0) as fh:
            while block := fh.read(64 << 20):
                total += len(block)
    return time.perf_counter() - start, total, cold


def baseline_rss_mb() -> float:
    """Peak RSS of a process that only imports streamprune (Python + torch + transformers)."""
    code = "import resource, streamprune.engine; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)"
    return float(subprocess.check_output([sys.executable, "-c", code], text=True).strip())


def run_engine(ckpt: Path, out: Path, args: dict, prefetch: bool) -> dict:
    """One `streamprune run` in a subprocess, from a cold page cache where the OS allows dropping it
    (so the read-ahead is measured against real disk reads, as for a checkpoint larger than RAM)."""
    cmd = [sys.executable, "-m", "streamprune", "run", str(ckpt), str(out), "--ratio", str(args["ratio"]),
           "--calib", "random", "--nsamples", str(args["nsamples"]), "--seqlen", str(args["seqlen"]),
           "--device", args["device"], "--dtype", args["dtype"], "--batch-size", str(args["batch_size"]),
           "--json", "--quiet", "--overwrite", "--restart"]
    if not prefetch:
        cmd.append("--no-prefetch")
    cmd += list(args.get("run_args", ()))
    cold = drop_page_cache()
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise click.ClickException(f"streamprune failed: {done.stderr.strip()[-500:]}")
    report = json.loads(done.stdout)
    report["wall_seconds"] = time.perf_counter() - start
    report["cold_cache"] = cold
    return report


def summarise(report: dict, ckpt: Path, args: dict) -> dict:
    layers = report["layers"]
    per_phase = {p: mean(layer["seconds"].get(p, 0.0) for layer in layers) for p in PASS2_PHASES}
    dense = [layer["seconds"].get("pass1_dense_forward") for layer in layers]
    dense_mean = mean(d for d in dense if d) if any(dense) else None
    method = sum(per_phase[p] for p in METHOD_PHASES)
    pass2_compute = sum(per_phase[p] for p in ("forward", *METHOD_PHASES))
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    sizes = _tensor_bytes(ckpt)
    layer_bytes = max(sum(b for n, b in sizes.items() if n.startswith(f"model.layers.{i}."))
                      for i in range(len(layers)))
    hidden = json.loads((ckpt / "config.json").read_text())["hidden_size"]
    activations = args["nsamples"] * args["seqlen"] * hidden * 4
    return {
        "layers": len(layers),
        "checkpoint_gb": index["metadata"]["total_size"] / 1e9,
        "layer_mb": layer_bytes / 2**20,
        "largest_tensor_mb": max(sizes.values()) / 2**20,
        "activations_mb": activations / 2**20,
        "budget_mb": (3 * layer_bytes + activations + max(sizes.values())) / 2**20,
        "peak_rss_mb": report["peak_rss_mb"],
        # the budget solved for its layer multiple: how many checkpoint-dtype layers the peak holds
        "layers_held": (report["peak_rss_mb"] - args["baseline_rss_mb"]
                        - (activations + max(sizes.values())) / 2**20) / (layer_bytes / 2**20),
        "cold_cache": report["cold_cache"],
        "peak_gpu_mb": report.get("peak_gpu_mb"),
        "wall_seconds": report["wall_seconds"],
        "per_layer_pass2_seconds": per_phase,
        "per_layer_pass1_dense_forward_seconds": dense_mean,
        "method_over_dense_forward": method / dense_mean if dense_mean else None,
        "pass2_compute_over_dense_forward": pass2_compute / dense_mean if dense_mean else None,
        # --reconstruct: the gradient windows' time (their forward passes included), apart from the method's
        "reconstruction_over_dense_forward": per_phase["reconstruction"] / dense_mean if dense_mean else None,
        "scoring_breakdown_note": "pca = eigh of the FFN output covariance; scoring = M, leave-one-out, "
                                  "greedy search and the channel scores (projection on the eigenbasis)",
        "achieved_ratio": report["achieved_ratio"],
    }


def _tensor_bytes(ckpt: Path) -> dict[str, int]:
    from safetensors import safe_open

    sizes = {}
    width = {"F16": 2, "BF16": 2, "F32": 4}
    for shard in ckpt.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as fh:
            for name in fh.keys():
                sl = fh.get_slice(name)
                n = 1
                for d in sl.get_shape():
                    n *= d
                sizes[name] = n * width[sl.get_dtype()]
    return sizes


def markdown(rows: list[dict], baseline: float) -> str:
    head = ("| layers | ckpt GB | layer MB | peak RSS MB | budget MB (+ baseline) | layers held | read floor s "
            "| wall s | dense fwd s/layer | method s/layer | method / dense fwd | pass-2 compute / dense fwd "
            "| reconstruction / dense fwd |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        p = r["per_layer_pass2_seconds"]
        method = sum(p[k] for k in METHOD_PHASES)
        lines.append(
            f"| {r['layers']} | {r['checkpoint_gb']:.2f} | {r['layer_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['budget_mb']:.0f} (+{baseline:.0f}) | {r['layers_held']:.2f} | {r['read_floor_seconds']:.1f} | "
            f"{r['wall_seconds']:.1f} | "
            f"{r['per_layer_pass1_dense_forward_seconds'] or float('nan'):.2f} | {method:.2f} | "
            f"{r['method_over_dense_forward'] or float('nan'):.2f} | "
            f"{r['pass2_compute_over_dense_forward'] or float('nan'):.2f} | "
            f"{r['reconstruction_over_dense_forward'] or 0.0:.2f} |"
        )
    return "\n".join(lines)


@click.command()
@click.option("--preset", default="llama2-7b", show_default=True)
@click.option("--layers", "layer_counts", type=int, multiple=True, default=(2,), show_default=True)
@click.option("--vocab", type=int, default=32000, show_default=True, help="Shrink llama3's vocab to save disk.")
@click.option("--dtype", "ckpt_dtype", default="float16", show_default=True, help="Checkpoint dtype.")
@click.option("--compute-dtype", "dtype", default="auto", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--ratio", type=float, default=0.2, show_default=True)
@click.option("--nsamples", type=int, default=32, show_default=True)
@click.option("--seqlen", type=int, default=128, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--compare-prefetch", is_flag=True, help="Also run without read-ahead and report the gain.")
@click.option("--run-arg", "run_args", multiple=True, help="Extra argument for `streamprune run` (repeatable).")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("/tmp/streamprune-bench"), show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
def main(preset, layer_counts, vocab, ckpt_dtype, dtype, device, ratio, nsamples, seqlen, batch_size,
         compare_prefetch, run_args, workdir, json_path) -> None:
    args = {"ratio": ratio, "nsamples": nsamples, "seqlen": seqlen, "device": device, "dtype": dtype,
            "batch_size": batch_size, "run_args": run_args}
    baseline = baseline_rss_mb()
    args["baseline_rss_mb"] = baseline
    rows = []
    for n in layer_counts:
        ckpt = workdir / f"{preset}-{n}L-{ckpt_dtype}"
        if not (ckpt / "config.json").is_file():
            make_checkpoint(ckpt, preset, layers=n, dtype=ckpt_dtype, vocab=vocab, overwrite=True)
        floor, nbytes, cold = sequential_read_seconds(ckpt)
        report = run_engine(ckpt, workdir / f"{ckpt.name}-pruned", args, prefetch=True)
        row = summarise(report, ckpt, args) | {"read_floor_seconds": floor, "read_floor_cold_cache": cold,
                                               "preset": preset, **args}
        if compare_prefetch:
            slow = run_engine(ckpt, workdir / f"{ckpt.name}-pruned", args, prefetch=False)
            row["wall_seconds_without_prefetch"] = slow["wall_seconds"]
            waits = [layer["seconds"].get("read", 0.0) for layer in slow["layers"]]
            row["read_wait_per_layer_without_prefetch"] = mean(waits)
            row["read_wait_per_layer_with_prefetch"] = row["per_layer_pass2_seconds"]["read"]
            row["peak_rss_mb_without_prefetch"] = slow["peak_rss_mb"]
        rows.append(row)
        click.echo(json.dumps(row, indent=2), err=True)
    click.echo(f"baseline RSS (python + torch + transformers imported): {baseline:.0f} MB")
    click.echo(markdown(rows, baseline))
    if json_path:
        json_path.write_text(json.dumps({"baseline_rss_mb": baseline, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
