"""How far can one pruned window be trained? Error against epochs and calibration size, for chosen layers.

Reconstruction (docs/method.md "Reconstruction by gradient") trains each pruned window for a few epochs on
the run's calibration sequences. This tool takes one layer of a pruned folder (closed form, no
reconstruction), rebuilds that layer's window problem outside the engine (the dense model's stream up to
the layer on `--nsamples` WikiText sequences, drawn as the engine draws them), and trains the window with
the engine's own trainer (reconstruction.WindowTrainer: Adam, cosine decay, every 5th sequence held out) for
each number of epochs asked, each time from the closed form. It reports three relative errors after /
before training:

- train: on the training sequences (what the optimiser sees): its floor is the pruned window's capacity;
- held-out calibration: the held-out sequences of the same text (what the engine's fallback looks at);
- held-out text: the first `--max-windows` windows of each `--eval-dir` source, on the dense stream.

    python tools/window_curve.py PRUNED_DIR --layers "10 20" --window mlp --nsamples "128 512" \
        --epochs "8 32 128" --json curve.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bench_quality import DEFAULT_CALIB  # noqa: E402  (tools/, beside this script)
from window_errors import DEMO_MODEL, EVAL_DIR, dense_windows  # noqa: E402

from streamprune.calibration import calibration_ids  # noqa: E402
from streamprune.evaluation import StreamedModel, text_windows  # noqa: E402
from streamprune.layer_pruning import LayerRuntime  # noqa: E402
from streamprune.loading import load_tokenizer  # noqa: E402
from streamprune.reconstruction import (  # noqa: E402
    WINDOW_PARTS,
    ReconstructionSettings,
    WindowTrainer,
    dimension_weights,
    window_forward,
)


@torch.no_grad()
def advance_to(dense: StreamedModel, streams: list[torch.Tensor], start: int, layer: int, window: str,
               rt: LayerRuntime) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Advance every stream (at layer `start`'s input) in place to layer `layer`'s input; return each one's
    (window input, dense window output) at that layer."""
    for i in range(start, layer):
        d = dense.layer(i, rt)
        for k, h in enumerate(streams):
            _, mid, mlp = dense_windows(d, h, rt.position_embeddings)
            streams[k] = mid + mlp
    d = dense.layer(layer, rt)
    pairs = []
    for h in streams:
        attn, mid, mlp = dense_windows(d, h, rt.position_embeddings)
        pairs.append((h, attn) if window == "attention" else (mid, mlp))
    return pairs


def train_once(pruned: StreamedModel, layer: int, window: str, rt: LayerRuntime, settings: ReconstructionSettings,
               calib: tuple[torch.Tensor, torch.Tensor], text: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Train the window from the closed form; the three errors after / before."""
    module = pruned.layer(layer, rt)
    params = [p for part in WINDOW_PARTS[window] for p in module.get_submodule(part).parameters()]
    forward = window_forward(window, module, rt.position_embeddings)
    trainer = WindowTrainer(params, forward, settings, rt.device, seed=layer)
    rows = torch.arange(text[0].shape[0])
    w = dimension_weights(*text, rows)
    text_scale = float((text[1].double().square() * w).sum(-1).mean())  # the error of a window that outputs 0
    text_before = trainer.error(*text, rows, w)
    start = time.perf_counter()
    report = trainer.run(window, *calib)
    seconds = time.perf_counter() - start
    if not report.kept:  # the trainer leaves the trained weights in place; the engine would keep the closed form
        text_after = text_before
    else:
        text_after = trainer.error(*text, rows, w)
    return {"train": report.train_after / report.train_before,
            "held_out_calibration": report.val_after / report.val_before,
            "held_out_text": text_after / text_before, "train_before": report.train_before,
            "text_before": text_before / text_scale, "best_epoch": report.best_epoch, "kept": report.kept,
            "seconds": round(seconds, 1)}


@click.command()
@click.argument("pruned_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--dense", "dense_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=DEMO_MODEL, show_default=True)
@click.option("--calib", default=str(DEFAULT_CALIB), show_default=True)
@click.option("--eval-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=EVAL_DIR,
              show_default=True)
@click.option("--layers", default="15", show_default=True, help="Space-separated layer indices.")
@click.option("--window", type=click.Choice(["attention", "mlp"]), default="mlp", show_default=True)
@click.option("--nsamples", default="128 512", show_default=True, help="Space-separated calibration sizes.")
@click.option("--epochs", default="8 32 128", show_default=True, help="Space-separated epoch counts.")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True, help="Calibration seed (as the run's --seed).")
@click.option("--max-windows", type=int, default=16, show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path))
def main(pruned_dir, dense_dir, calib, eval_dir, layers, window, nsamples, epochs, lr, seed, max_windows, json_path):
    tokenizer = load_tokenizer(dense_dir)
    dense, pruned = StreamedModel(dense_dir), StreamedModel(pruned_dir)
    cpu = torch.device("cpu")
    rt = LayerRuntime(cpu, torch.float32, 8, dense.adapter.rotary_tables(dense.config, 128, cpu, torch.float32))
    text_ids = torch.cat([text_windows(p.read_text(encoding="utf-8"), tokenizer, 128, max_windows)
                          for p in sorted(eval_dir.glob("*.txt"))])
    result = {"command": " ".join(sys.argv), "pruned": str(pruned_dir), "window": window, "rows": []}
    print("| layer | sequences | epochs | train | held-out calibration | held-out text | best epoch | s |")
    print("|---|---|---|---|---|---|---|---|")
    for n in map(int, nsamples.split()):
        ids = calibration_ids(calib, tokenizer, n, 128, seed, dense_dir)
        streams, at = [dense.embed(ids).float(), dense.embed(text_ids).float()], 0
        for layer in sorted(map(int, layers.split())):  # the streams advance once, layer by layer
            calib_pair, text_pair = advance_to(dense, streams, at, layer, window, rt)
            at = layer
            for e in map(int, epochs.split()):
                settings = ReconstructionSettings((window,), "dense", e, lr, 8, 5, seed)
                row = {"layer": layer, "nsamples": n, "epochs": e,
                       **train_once(pruned, layer, window, rt, settings, calib_pair, text_pair)}
                result["rows"].append(row)
                print(f"| {layer} | {n} | {e} | {row['train']:.3f} | {row['held_out_calibration']:.3f} | "
                      f"{row['held_out_text']:.3f} | {row['best_epoch']} | {row['seconds']:.0f} |", flush=True)
                if json_path:
                    json_path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
