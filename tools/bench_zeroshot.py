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

    python tools/zeroshot_data.py --out ~/.cache/streamprune/zeroshot      # once
    python tools/bench_zeroshot.py --limit 500 --pruned /tmp/p20-default --pruned /tmp/p20-paper \\
        --json docs/zeroshot.json
"""

from __future__ import annotations

import json
import os
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
    """{task: {acc, acc_stderr, acc_norm, acc_norm_stderr, items}} for one model folder (dense or pruned)."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from streamprune.loading import load_pruned, load_tokenizer

    model = load_pruned(model_dir, dtype=torch.float32, device=device)
    lm = HFLM(pretrained=model, tokenizer=load_tokenizer(model_dir), batch_size=batch_size, device=device)
    output = simple_evaluate(model=lm, tasks=configs, num_fewshot=0, limit=limit, log_samples=False,
                             bootstrap_iters=1000)
    scores = {}
    for config in configs:
        name = config["task"].removeprefix("local_")
        result = output["results"][config["task"]]
        scores[name] = {key: result[f"{key},none"] for key in METRICS}
        scores[name].update({f"{key}_stderr": result[f"{key}_stderr,none"] for key in METRICS})
        scores[name]["items"] = output["n-samples"][config["task"]]["effective"]
    return scores


def headline(scores: dict) -> float:
    """Mean over tasks of each task's headline metric (ARC-easy acc, PIQA acc, HellaSwag acc_norm)."""
    values = [scores[name][TASKS[name][2]] for name in scores]
    return sum(values) / len(values)


def markdown(rows: list[dict], tasks: list[str], command: str, limit: int | None) -> str:
    dense_mean = rows[0]["mean"]
    header = " | ".join(f"{t} acc | {t} acc_norm" for t in tasks)
    lines = [f"Commit {git_commit()}; `{command}`; 0-shot, first {limit or 'all'} items per task. "
             "Cells: accuracy (standard error); the headline metric of each task is in bold.", "",
             f"| model | {header} | mean | retention |", "|---|" + "---|---|" * len(tasks) + "---|---|"]
    for row in rows:
        cells = []
        for task in tasks:
            for key in METRICS:
                cell = f"{row['scores'][task][key]:.3f} ({row['scores'][task][key + '_stderr']:.3f})"
                cells.append(f"**{cell}**" if key == TASKS[task][2] else cell)
        lines.append(f"| {row['model']} | " + " | ".join(cells)
                     + f" | {row['mean']:.3f} | {row['mean'] / dense_mean:.1%} |")
    return "\n".join(lines)


def parse_model(spec: str) -> tuple[str, Path]:
    """`LABEL=PATH` or a bare `PATH` (labelled by its folder name)."""
    label, sep, path = spec.partition("=")
    path = Path(path if sep else spec).expanduser()
    if not (path / "config.json").is_file():
        raise click.ClickException(f"{path} is not a model folder (no config.json)")
    return (label if sep else path.name), path


@click.command()
@click.option("--model-dir", type=click.Path(path_type=Path), default=None,
              help="Dense model [default: the demo's SmolLM2-135M-Instruct, converted into the cache].")
@click.option("--pruned", "pruned_specs", multiple=True, help="A pruned model folder, or LABEL=FOLDER; repeatable.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=DEFAULT_DATA_DIR, show_default=True,
              help="Folder of <task>.jsonl files (tools/zeroshot_data.py).")
@click.option("--tasks", default=" ".join(TASKS), show_default=True, help="Space-separated task names.")
@click.option("--limit", type=int, default=500, show_default=True, help="First N items per task; 0 = all.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write the rows here.")
def main(model_dir, pruned_specs, data_dir, tasks, limit, batch_size, device, json_path) -> None:
    tasks = tasks.split()
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise click.ClickException(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    if model_dir is None:
        from streamprune.gguf_convert import default_cache_dir, demo_model_dir

        model_dir = demo_model_dir(default_cache_dir())
    models = [("dense", parse_model(str(model_dir))[1])] + [parse_model(spec) for spec in pruned_specs]
    configs = local_task_configs(tasks, data_dir)
    rows = []
    for label, path in models:
        start = time.perf_counter()
        scores = evaluate_model(path, configs, limit or None, batch_size, device)
        rows.append({"model": label, "path": str(path), "scores": scores, "mean": headline(scores),
                     "seconds": time.perf_counter() - start})
        click.echo(json.dumps(rows[-1]), err=True)
    for row in rows:
        row["retention"] = row["mean"] / rows[0]["mean"]
    command = "python tools/bench_zeroshot.py " + " ".join(sys.argv[1:])
    click.echo(markdown(rows, tasks, command, limit or None))
    if json_path:
        payload = {"commit": git_commit(), "command": command, "limit": limit or None, "num_fewshot": 0,
                   "headline": {t: TASKS[t][2] for t in tasks}, "rows": rows}
        json_path.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
