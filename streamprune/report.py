"""`streamprune report OUT_DIR`: the run report as a text table and a PNG figure."""

from __future__ import annotations

from pathlib import Path

from .extras import require
from .output import read_report


def report_table(report: dict) -> str:
    """One row per layer: cosine score, planned ratio, heads / channels kept, parameters, and how much of
    the error of plain removal each recovery left (o_proj, down_proj: recovered / removed mean squared error);
    with --reconstruct, each window's held-out error before and after (reconstruction.WindowReport)."""
    header = f"{'layer':>5} {'cosine':>7} {'ratio':>6} {'heads':>7} {'kv':>3} {'channels':>11} " \
             f"{'params before':>14} {'after':>12} {'o_proj err':>10} {'down err':>8}"
    reconstructed = any(layer.get("reconstruction") for layer in report["layers"])
    if reconstructed:
        header += f" {'recon attn':>17} {'recon mlp':>17}"
    rows = [header, "-" * len(header)]
    for layer in report["layers"]:
        score = "-" if layer.get("score") is None else f"{layer['score']:.4f}"
        o_fit, d_fit = layer.get("o_proj_fit"), layer.get("down_proj_fit")
        row = (
            f"{layer['layer']:>5} {score:>7} {layer['plan_ratio']:>6.3f} "
            f"{layer['heads_kept']:>3}/{layer['heads_total']:<3} {layer['kv_heads_kept']:>3} "
            f"{layer['channels_kept']:>5}/{layer['channels_total']:<5} {layer['params_before']:>14,} "
            f"{layer['params_after']:>12,} {_left(o_fit):>10} {_left(d_fit):>8}"
        )
        if reconstructed:
            windows = {w["window"]: w for w in layer.get("reconstruction") or []}
            row += f" {_window(windows.get('attention')):>17} {_window(windows.get('mlp')):>17}"
        rows.append(row)
    rows.append("-" * len(header))
    rows.append(f"total parameters {report['params_before']:,} -> {report['params_after']:,} "
                f"({report['achieved_ratio']:.2%} removed, target {report['allocation']['target_ratio']:.2%})")
    return "\n".join(rows)


def _window(window: dict | None) -> str:
    """Held-out error of a reconstruction window: 'before>after' when kept, 'before cf' when the closed form
    stayed (no epoch beat it), '-' when the window was not reconstructed."""
    if window is None:
        return "-"
    if window["kept"]:
        return f"{window['val_before']:.3g}>{window['val_after']:.3g}"
    return f"{window['val_before']:.3g} cf" + (" nan" if window.get("non_finite") else "")


def _left(fit: dict | None) -> str:
    """The share of the removal error that the recovery left (lower is better; 1.000 = no help)."""
    if fit is None or not fit["mse_removed"]:
        return "-"
    return f"{fit['mse_recovered'] / fit['mse_removed']:.3f}"


def report_figure(report: dict, path: Path) -> Path:
    """Four panels: cosine score and ratio, heads kept, channels kept, parameters before/after."""
    plt = pyplot()
    layers = report["layers"]
    idx = [layer["layer"] for layer in layers]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), constrained_layout=True)
    ax = axes[0, 0]
    if any(layer.get("score") is not None for layer in layers):
        ax.plot(idx, [layer.get("score") for layer in layers], "o-", color="tab:blue", label="cosine(in, out)")
    ax.set_ylabel("input/output cosine")
    twin = ax.twinx()
    twin.bar(idx, [layer["plan_ratio"] for layer in layers], alpha=0.3, color="tab:red", label="ratio")
    twin.set_ylabel("pruning ratio")
    ax.set_title("Layer redundancy and allocated ratio")
    _bars(axes[0, 1], idx, layers, "heads_kept", "heads_total", "Attention heads kept")
    _bars(axes[1, 0], idx, layers, "channels_kept", "channels_total", "FFN channels kept")
    ax = axes[1, 1]
    ax.bar(idx, [layer["params_before"] / 1e6 for layer in layers], color="lightgray", label="before")
    ax.bar(idx, [layer["params_after"] / 1e6 for layer in layers], color="tab:green", label="after")
    ax.set_ylabel("parameters (M)")
    ax.set_title("Parameters per layer")
    ax.legend()
    for ax in axes.flat:
        ax.set_xlabel("layer")
    return _finish_figure(fig, report, path)


def pyplot():
    """matplotlib's pyplot drawing to files only (no display needed), or a one-line error naming the extra."""
    matplotlib = require("matplotlib", "the figure")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(ax, idx, layers, kept: str, total: str, title: str) -> None:
    ax.bar(idx, [layer[total] for layer in layers], color="lightgray", label="before")
    ax.bar(idx, [layer[kept] for layer in layers], color="tab:blue", label="kept")
    ax.set_title(title)
    ax.legend()


def render_report(out_dir: str | Path, png: str | Path | None = None) -> tuple[str, Path]:
    report = read_report(out_dir)
    path = Path(png) if png else Path(out_dir) / "streamprune_report.png"
    return report_table(report), report_figure(report, path)


def demo_figure(report: dict, dense_ppl: float, pruned_ppl: float, path: Path) -> Path:
    """Two panels: what each layer kept (heads, FFN channels, parameters) and dense vs pruned perplexity."""
    plt = pyplot()
    layers = report["layers"]
    idx = [layer["layer"] for layer in layers]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]},
                                 constrained_layout=True)
    ax.plot(idx, [layer["heads_kept"] / layer["heads_total"] for layer in layers], "o-", label="attention heads")
    ax.plot(idx, [layer["channels_kept"] / layer["channels_total"] for layer in layers], "s-", label="FFN channels")
    ax.plot(idx, [layer["params_after"] / layer["params_before"] for layer in layers], "k--", label="parameters")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction kept")
    ax.set_title("What each layer kept")
    ax.legend(loc="lower right")
    bars = bx.bar(["dense", "pruned"], [dense_ppl, pruned_ppl], color=["tab:gray", "tab:green"])
    bx.bar_label(bars, fmt="%.1f")
    bx.set_ylabel("perplexity (lower is better)")
    bx.set_title("Held-out perplexity")
    return _finish_figure(fig, report, path)


def _finish_figure(fig, report: dict, path):
    """Title the figure with the model and its parameter counts, save it as PNG, free it."""
    import matplotlib.pyplot as plt

    fig.suptitle(f"{Path(report['model_dir']).name}: {report['params_before'] / 1e6:.1f}M -> "
                 f"{report['params_after'] / 1e6:.1f}M parameters ({report['achieved_ratio']:.1%} removed)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
