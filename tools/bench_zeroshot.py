"""Zero-shot multiple-choice accuracy of pruned models vs the dense one, with lm-evaluation-harness.

A benchmark, not a test: it needs `pip install -e '.[zeroshot]'` (lm_eval) and the local task files of
tools/zeroshot_data.py (the Hub is not reachable here, so the harness cannot fetch its own copies).
Each task reuses the harness's own task definition (prompt, choices, acc / acc_norm metrics) and only
swaps its dataset for the local JSON-lines file:

- piqa: PIQA validation, "Question: {goal}\\nAnswer:", headline metric acc;
- arc_easy: ARC-Easy test, "Question: {question}\\nAnswer:", headline metric acc;
- hellaswag: HellaSwag validation, "{activity}: {context}", headline metric acc_norm.

The headline is the mean of those three metrics (the mean LLM-Pruner / SlimLLM style tables quote), and a
pruned model's retention is its mean divided by the dense model's mean. `--limit N` evaluates the first N
items of each task (the harness's own `--limit`), 0-shot.

Retention comes with a paired bootstrap interval: the items of each task are resampled with replacement, the
same items for the dense and the pruned model, so the interval reflects how much the ratio depends on which
items were drawn (far narrower than the two accuracies' separate standard errors suggest, because both models
find the same items easy or hard). The JSON keeps every item's headline score, so intervals can be recomputed.
With `--json` the file is rewritten after every model, and `--resume` keeps the rows already in it (same
tasks, same limit, same label and folder) instead of evaluating those models again.

    python tools/zeroshot_data.py --out ~/.cache/streamprune/zeroshot      # once
    python tools/bench_zeroshot.py --limit 500 --pruned /tmp/p20-default --pruned /tmp/p20-paper \\
        --json docs/zeroshot.json
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import click

# Local data only: never let datasets / transformers try the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = Path("~/.cache/streamprune/zeroshot").expanduser()
# Our name -> (the harness's task whose definition is reused, the split our file stands for, headline metric).
TASKS: dict[str, tuple[str, str, str]] = {
    "arc_easy": ("arc_easy", "test", "acc"),
    "piqa": ("piqa", "validation", "acc"),
    "hellaswag": ("hellaswag", "validation", "acc_norm"),
}
METRICS = ("acc", "acc_norm")
BOOTSTRAP_ITERS = 2000


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, cwd=ROOT).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def local_task_configs(tasks: list[str], data_dir: Path) -> list[dict]:
    """The harness's own config of each task, its dataset replaced by `data_dir/<task>.jsonl`."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    index = TaskManager().task_index
    configs = []
    for name in tasks:
        harness_name, split, _ = TASKS[name]
        path = data_dir / f"{name}.jsonl"
        if not path.is_file():
            raise click.ClickException(f"{path} is missing: run tools/zeroshot_data.py --out {data_dir} first")
        config = load_yaml(index[harness_name].yaml_path, resolve_func=True)
        config.pop("tag", None)
        config.update(task=f"local_{name}", dataset_path="json", dataset_name=None,
                      dataset_kwargs={"data_files": {split: str(path)}}, training_split=None,
                      validation_split=split if split == "validation" else None,
                      test_split=split if split == "test" else None)
        configs.append(config)
    return configs


def evaluate_model(model_dir: Path, configs: list[dict], limit: int | None, batch_size: int, device: str) -> dict:
    """{task: {acc, acc_stderr, acc_norm, acc_norm_stderr, items, per_item}} for one model folder (dense or pruned).

    `per_item` lists the headline metric of every item (0 or 1) in document order.
    """
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from streamprune.loading import load_pruned, load_tokenizer

    model = load_pruned(model_dir, dtype=torch.float32, device=device)
    lm = HFLM(pretrained=model, tokenizer=load_tokenizer(model_dir), batch_size=batch_size, device=device)
    output = simple_evaluate(model=lm, tasks=configs, num_fewshot=0, limit=limit, log_samples=True,
                             bootstrap_iters=1000)
    scores = {}
    for config in configs:
        name = config["task"].removeprefix("local_")
        result = output["results"][config["task"]]
        scores[name] = {key: result[f"{key},none"] for key in METRICS}
        scores[name].update({f"{key}_stderr": result[f"{key}_stderr,none"] for key in METRICS})
        scores[name]["items"] = output["n-samples"][config["task"]]["effective"]
        samples = sorted(output["samples"][config["task"]], key=lambda sample: sample["doc_id"])
        scores[name]["per_item"] = [int(sample[TASKS[name][2]]) for sample in samples]
    return scores


def headline(scores: dict) -> float:
    """Mean over tasks of each task's headline metric (ARC-easy acc, PIQA acc, HellaSwag acc_norm)."""
    values = [scores[name][TASKS[name][2]] for name in scores]
    return sum(values) / len(values)


def retention_interval(dense: dict, pruned: dict, iters: int = BOOTSTRAP_ITERS, seed: int = 0) -> tuple[float, float]:
    """95 % paired-bootstrap interval of headline(pruned) / headline(dense) from per-item scores.

    Each iteration draws, per task, item indices with replacement and uses the same indices for both models.
    """
    rng = random.Random(seed)
    tasks = list(dense)
    for task in tasks:
        if len(dense[task]["per_item"]) != len(pruned[task]["per_item"]):
            raise click.ClickException(f"{task}: the dense and pruned runs scored different numbers of items")
    ratios = []
    for _ in range(iters):
        dense_means, pruned_means = [], []
        for task in tasks:
            d, p = dense[task]["per_item"], pruned[task]["per_item"]
            picks = [rng.randrange(len(d)) for _ in d]
            dense_means.append(sum(d[i] for i in picks) / len(picks))
            pruned_means.append(sum(p[i] for i in picks) / len(picks))
        ratios.append(sum(pruned_means) / sum(dense_means))
    ratios.sort()
    return ratios[int(0.025 * iters)], ratios[int(0.975 * iters) - 1]


def markdown(rows: list[dict], tasks: list[str], command: str, limit: int | None) -> str:
    dense_mean = rows[0]["mean"]
    header = " | ".join(f"{t} acc | {t} acc_norm" for t in tasks)
    lines = [f"Commit {git_commit()}; `{command}`; 0-shot, first {limit or 'all'} items per task. "
             "Cells: accuracy (standard error); the headline metric of each task is in bold.", "",
             f"| model | {header} | mean | retention (95 % CI) |", "|---|" + "---|---|" * len(tasks) + "---|---|"]
    for row in rows:
        cells = []
        for task in tasks:
            for key in METRICS:
                cell = f"{row['scores'][task][key]:.3f} ({row['scores'][task][key + '_stderr']:.3f})"
                cells.append(f"**{cell}**" if key == TASKS[task][2] else cell)
        low, high = row.get("retention_ci", (1.0, 1.0))
        interval = f" ({low:.1%}-{high:.1%})" if row is not rows[0] else ""
        lines.append(f"| {row['model']} | " + " | ".join(cells)
                     + f" | {row['mean']:.3f} | {row['mean'] / dense_mean:.1%}{interval} |")
    return "\n".join(lines)


def parse_model(spec: str) -> tuple[str, Path]:
    """`LABEL=PATH` or a bare `PATH` (labelled by its folder name)."""
    label, sep, path = spec.partition("=")
    path = Path(path if sep else spec).expanduser()
    if not (path / "config.json").is_file():
        raise click.ClickException(f"{path} is not a model folder (no config.json)")
    return (label if sep else path.name), path


def data_files(tasks: list[str], data_dir: Path) -> dict[str, dict]:
    """Which task files were read: path and SHA-256, so a table can be tied to its data."""
    import hashlib

    return {t: {"path": str(data_dir / f"{t}.jsonl"),
                "sha256": hashlib.sha256((data_dir / f"{t}.jsonl").read_bytes()).hexdigest()} for t in tasks}


def load_previous(json_path: Path | None, tasks: list[str], limit: int | None) -> list[dict]:
    """Rows of an earlier run of the same tasks and limit (for --resume), per-item strings back to lists."""
    if json_path is None or not json_path.is_file():
        return []
    try:
        payload = json.loads(json_path.read_text())
    except json.JSONDecodeError as exc:
        raise click.ClickException(f"{json_path}: not JSON ({exc.msg}); remove it or drop --resume") from exc
    if payload.get("tasks") != tasks or payload.get("limit") != limit:
        raise click.ClickException(f"{json_path} holds other tasks or another --limit; remove it or drop --resume")
    for row in payload["rows"]:
        for score in row["scores"].values():
            score["per_item"] = [int(c) for c in score["per_item"]]
    return payload["rows"]


def write_json(json_path: Path, payload: dict) -> None:
    """Per-item scores as '0110...' strings (one line per task); written via a temporary name, then renamed."""
    def compact(scores: dict) -> dict:
        return {t: {**v, "per_item": "".join(map(str, v["per_item"]))} for t, v in scores.items()}

    rows = [{**row, "scores": compact(row["scores"])} for row in payload["rows"]]
    tmp = json_path.with_name(f".{json_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**payload, "rows": rows}, indent=2) + "\n")
    tmp.replace(json_path)


def finish_rows(rows: list[dict]) -> None:
    """Retention and its paired-bootstrap interval of every row against the first (dense) row."""
    for row in rows:
        row["retention"] = row["mean"] / rows[0]["mean"]
        if row is not rows[0]:
            row["retention_ci"] = list(retention_interval(rows[0]["scores"], row["scores"]))


@click.command()
@click.option("--model-dir", type=click.Path(path_type=Path), default=None,
              help="Dense model [default: the demo's SmolLM2-135M-Instruct, converted into the cache].")
@click.option("--pruned", "pruned_specs", multiple=True, help="A pruned model folder, or LABEL=FOLDER; repeatable.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=DEFAULT_DATA_DIR, show_default=True,
              help="Folder of <task>.jsonl files (tools/zeroshot_data.py).")
@click.option("--tasks", default=" ".join(TASKS), show_default=True, help="Space-separated task names.")
@click.option("--limit", type=click.IntRange(min=0), default=500, show_default=True,
              help="First N items per task; 0 = all.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write the rows here (rewritten after every model).")
@click.option("--resume", is_flag=True,
              help="Keep the rows already in --json (same tasks and limit; same label and folder) instead of "
                   "evaluating those models again.")
def main(model_dir, pruned_specs, data_dir, tasks, limit, batch_size, device, json_path, resume) -> None:
    """Zero-shot PIQA / ARC-Easy / HellaSwag of a dense model and its pruned versions (lm-evaluation-harness)."""
    tasks = tasks.split()
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise click.ClickException(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    if resume and json_path is None:
        raise click.ClickException("--resume needs --json")
    if model_dir is None:
        from streamprune.demo.gguf_import import default_cache_dir, demo_model_dir

        model_dir = demo_model_dir(default_cache_dir())
    models = [("dense", parse_model(str(model_dir))[1])] + [parse_model(spec) for spec in pruned_specs]
    labels = [label for label, _ in models]
    if len(set(labels)) != len(labels):
        raise click.ClickException(f"two models share a label: {' '.join(labels)}; use LABEL=FOLDER")
    limit = limit or None
    previous = {(r["model"], r["path"]): r for r in (load_previous(json_path, tasks, limit) if resume else [])}
    configs = local_task_configs(tasks, data_dir)
    command = "python tools/bench_zeroshot.py " + " ".join(sys.argv[1:])
    payload = {"commit": git_commit(), "command": command, "tasks": tasks, "limit": limit, "num_fewshot": 0,
               "headline": {t: TASKS[t][2] for t in tasks}, "data": data_files(tasks, data_dir),
               "environment": environment(device), "rows": []}
    rows = payload["rows"]
    for label, path in models:
        if (label, str(path)) in previous:
            rows.append(previous[(label, str(path))])
            click.echo(f"{label}: kept from {json_path}", err=True)
            continue
        start = time.perf_counter()
        scores = evaluate_model(path, configs, limit, batch_size, device)
        rows.append({"model": label, "path": str(path), "scores": scores, "mean": headline(scores),
                     "seconds": round(time.perf_counter() - start, 1), "command": command})
        click.echo(f"{label}: mean {rows[-1]['mean']:.4f}, {rows[-1]['seconds']:.0f} s", err=True)
        finish_rows(rows)
        if json_path:
            write_json(json_path, payload)
    finish_rows(rows)
    click.echo(markdown(rows, tasks, command, limit))
    if json_path:
        write_json(json_path, payload)


def environment(device: str) -> dict:
    import lm_eval
    import torch

    return {"lm_eval": getattr(lm_eval, "__version__", "unknown"), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "device": device}


if __name__ == "__main__":
    main()
