"""Per-layer errors of pruned models on held-out text: does a window's gain on calibration carry over?

Reconstruction (docs/method.md "Reconstruction by gradient") lowers each window's error on held-out
*calibration* sequences (the report's val_before / val_after). This tool measures the same errors on other
text, and how they add up along the stream. For each evaluation source (its first `--max-windows` windows of
128 tokens) the dense model's stream h_0 .. h_L is computed once; then for every model and every layer l:

    attention error  E_a = sum w_d (attn_P(h_l) - attn_D(h_l))_d^2 / sum w_d attn_D(h_l)_d^2,  w = 1 / mean(mid_l^2)
    FFN error        E_m = sum w_d (mlp_P(mid_l) - mlp_D(mid_l))_d^2 / sum w_d mlp_D(mid_l)_d^2, w = 1 / mean(h_{l+1}^2)
    stream error     S_l = sum w_d (g_{l+1} - h_{l+1})_d^2 / sum w_d (h_{l+1})_d^2              (same w as E_m)

where mid_l = h_l + attn_D(h_l) is the dense stream after layer l's attention, attn_X / mlp_X the window of
model X (P pruned, D dense) and g the pruned model's own stream. E_a and E_m are the objective reconstruction
trains with `--reconstruct-inputs dense` (per window, on the dense model's inputs), so the ratio of a
reconstructed model's error to the closed form's on the same layer is directly comparable with the
report's val_after / val_before. S is what the next layers and the head actually see.

    python tools/window_errors.py CLOSED_DIR RECONSTRUCTED_DIR ... --max-windows 16 --json errors.json

The first model is the baseline the others are compared with (the closed form of the same seed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from streamprune.demo.gguf_import import default_cache_dir, demo_model_dir  # noqa: E402
from streamprune.evaluation import StreamedModel, text_windows  # noqa: E402
from streamprune.layer_pruning import LayerRuntime  # noqa: E402
from streamprune.loading import load_tokenizer  # noqa: E402

DEMO_MODEL = demo_model_dir(default_cache_dir())  # the demo's SmolLM2-135M-Instruct (streamprune demo makes it)
EVAL_DIR = Path("~/.cache/streamprune/eval-texts").expanduser()  # tools/eval_texts.py makes it


def weighted_error(diff: torch.Tensor, ref: torch.Tensor, w: torch.Tensor) -> float:
    """sum_t,d w_d diff^2 / sum_t,d w_d ref^2, in float64."""
    return float((diff.double().square() * w).sum() / (ref.double().square() * w).sum())


def inverse_mean_square(x: torch.Tensor) -> torch.Tensor:
    return 1 / x.double().square().reshape(-1, x.shape[-1]).mean(0)


def dense_windows(layer: torch.nn.Module, h: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decoder layer split into its two windows: (attention output, stream after it, FFN output)."""
    attn = layer.self_attn(hidden_states=layer.input_layernorm(h), position_embeddings=position_embeddings,
                           attention_mask=None)[0]
    mid = h + attn
    return attn, mid, layer.mlp(layer.post_attention_layernorm(mid))


@torch.no_grad()
def layer_errors(dense_dir: Path, model_dirs: list[Path], windows: torch.Tensor) -> list[dict]:
    """Per model: lists of E_a, E_m and S over the layers (NaN-free; 0 where the window equals the dense one)."""
    dense = StreamedModel(dense_dir)
    models = [StreamedModel(d) for d in model_dirs]
    cpu = torch.device("cpu")
    rt = LayerRuntime(cpu, torch.float32, 8, dense.adapter.rotary_tables(dense.config, windows.shape[1], cpu,
                                                                         torch.float32))
    pe = rt.position_embeddings
    h = dense.embed(windows).float()
    streams = [m.embed(windows).float() for m in models]
    out = [{"attention": [], "mlp": [], "stream": []} for _ in models]
    for i in range(dense.num_layers):
        d = dense.layer(i, rt)
        attn_d, mid, mlp_d = dense_windows(d, h, pe)
        nxt = mid + mlp_d
        w_mid, w_out = inverse_mean_square(mid), inverse_mean_square(nxt)
        for k, m in enumerate(models):
            p = m.layer(i, rt)
            attn_p = p.self_attn(hidden_states=p.input_layernorm(h), position_embeddings=pe, attention_mask=None)[0]
            mlp_p = p.mlp(p.post_attention_layernorm(mid))
            streams[k] = p(streams[k], position_embeddings=pe).float()
            out[k]["attention"].append(weighted_error(attn_p - attn_d, attn_d, w_mid))
            out[k]["mlp"].append(weighted_error(mlp_p - mlp_d, mlp_d, w_out))
            out[k]["stream"].append(weighted_error(streams[k] - nxt, nxt, w_out))
            del p
        h = nxt
        del d
    return out


def held_out_ratios(model_dir: Path) -> dict[str, float]:
    """Mean over windows of the report's val_after / val_before (1 where the closed form was kept), per kind."""
    report = json.loads((model_dir / "streamprune_report.json").read_text())
    ratios: dict[str, list[float]] = {}
    for layer in report["layers"]:
        for w in layer.get("reconstruction") or []:
            ratios.setdefault(w["window"], []).append(w["val_after"] / w["val_before"])
    return {k: sum(v) / len(v) for k, v in ratios.items()}


def _fmt(value: float, digits: int) -> str:
    return "-" if value != value else f"{value:.{digits}f}"  # NaN: no layer pruned this window


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarise(errors: list[dict], names: list[str]) -> list[dict]:
    """Per model, against the first: mean per-layer error ratio over the layers where the baseline's window
    differs from the dense one (a pruned window), and the stream error at the last layer."""
    base = errors[0]
    rows = []
    for name, e in zip(names, errors, strict=True):
        row = {"model": name}
        for kind in ("attention", "mlp"):
            layers = [i for i, b in enumerate(base[kind]) if b > 1e-9]
            row[f"{kind}_error"] = _mean([e[kind][i] for i in layers])
            row[f"{kind}_vs_first"] = _mean([e[kind][i] / base[kind][i] for i in layers])
        row["stream_last"] = e["stream"][-1]
        row["stream_last_vs_first"] = e["stream"][-1] / base["stream"][-1]
        rows.append(row)
    return rows


@click.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--dense", "dense_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=DEMO_MODEL, show_default=True)
@click.option("--eval-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=EVAL_DIR,
              show_default=True)
@click.option("--max-windows", type=int, default=16, show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path))
def main(models, dense_dir, eval_dir, max_windows, json_path):
    tokenizer = load_tokenizer(dense_dir)
    names = [f"{m.parent.name}/{m.name}" for m in models]
    result = {"command": " ".join(sys.argv), "models": names, "held_out_calibration": {}, "sources": {}}
    for name, m in zip(names, models, strict=True):
        if (m / "streamprune_report.json").is_file():
            result["held_out_calibration"][name] = held_out_ratios(m)
    print("| source | model | attention error | vs first | FFN error | vs first | stream error, last layer "
          "| vs first |")
    print("|---|---|---|---|---|---|---|---|")
    for path in sorted(eval_dir.glob("*.txt")):
        windows = text_windows(path.read_text(encoding="utf-8"), tokenizer, 128, max_windows)
        errors = layer_errors(dense_dir, list(models), windows)
        rows = summarise(errors, names)
        result["sources"][path.stem] = {"per_layer": dict(zip(names, errors, strict=True)), "summary": rows}
        for r in rows:
            cells = [_fmt(r[k], digits) for k, digits in (("attention_error", 4), ("attention_vs_first", 3),
                     ("mlp_error", 4), ("mlp_vs_first", 3), ("stream_last", 4), ("stream_last_vs_first", 3))]
            print(f"| {path.stem} | {r['model']} | " + " | ".join(cells) + " |", flush=True)
    print("\nHeld-out calibration sequences (report, mean val_after / val_before over windows):")
    for name, ratios in result["held_out_calibration"].items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    if json_path:
        json_path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
