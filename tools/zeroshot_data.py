"""Prepare the local multiple-choice task files used by tools/bench_zeroshot.py (never committed to git).

The Hugging Face Hub is not reachable here, so lm-evaluation-harness cannot fetch its own copies. The
same items come from snapshots of public GitHub repositories instead:

- piqa: PIQA validation, 1,838 items (goal, sol1, sol2 + label).
  ybisk/ybisk.github.io @ 21edab4, piqa/data/valid.jsonl and piqa/data/valid-labels.lst (the authors'
  own files). Academic Free License 3.0.
- arc_easy: ARC-Easy test, 2,376 items, already in the harness's `allenai/ai2_arc` field layout.
  zhaoxlpku/HKU-DASC7606-A2 @ fcca017, data/ARC-Easy-test.jsonl (a course's copy of the AI2 release).
  ARC: CC BY-SA 4.0 (Allen Institute for AI).
- hellaswag: HellaSwag validation, 10,042 items. rowanz/hellaswag's data/hellaswag_val.jsonl is too large
  for a snapshot; klosax/hellaswag_text_data @ 1105d37, hellaswag_val_full.txt.bz2 holds the same items in
  the same order as text (llama.cpp's form: "activity_label: ctx", the gold label, four endings, each
  already cleaned of most WikiHow "[title]"/"[step]" tags). HellaSwag: MIT (Rowan Zellers).
  That form has lost the split of `ctx` into `ctx_a` and `ctx_b`, which the harness uses to capitalise
  `ctx_b`; it is rebuilt as "the trailing fragment after the last '. ' when it starts in lower case"
  (ActivityNet items, e.g. "... on a roof. he"), otherwise `ctx_b` is empty (WikiHow items). The prompt
  can therefore differ from the harness's in the case of a few letters.

Each task becomes one JSON-lines file whose fields are the ones the harness's own task (piqa, arc_easy,
hellaswag) reads, so tools/bench_zeroshot.py can reuse its prompts and metrics unchanged. `--mirror` is
a folder of repository snapshots: one folder per source repository, named OWNER+NAME, holding a git
repository (bare, or a clone) under `repo/` whose HEAD is the commit named above.

    python tools/zeroshot_data.py --mirror SNAPSHOTS --out ~/.cache/streamprune/zeroshot
"""

from __future__ import annotations

import bz2
import json
import os
import re
import subprocess
from pathlib import Path

import click

SOURCES = {
    "piqa": ("ybisk+ybisk.github.io", ["piqa/data/valid.jsonl", "piqa/data/valid-labels.lst"]),
    "arc_easy": ("zhaoxlpku+HKU-DASC7606-A2", ["data/ARC-Easy-test.jsonl"]),
    "hellaswag": ("klosax+hellaswag_text_data", ["hellaswag_val_full.txt.bz2"]),
}
EXPECTED_ITEMS = {"piqa": 1838, "arc_easy": 2376, "hellaswag": 10042}
DEFAULT_OUT = Path("~/.cache/streamprune/zeroshot").expanduser()


def git_show(repo: Path, path: str) -> bytes:
    git_dir = repo / "repo"
    if (git_dir / ".git").is_dir():
        git_dir = git_dir / ".git"
    return subprocess.check_output(["git", f"--git-dir={git_dir}", "show", f"HEAD:{path}"])


def piqa_items(questions: str, labels: str) -> list[dict]:
    rows = [json.loads(line) for line in questions.splitlines() if line.strip()]
    golds = [int(line) for line in labels.split()]
    if len(rows) != len(golds):
        raise click.ClickException(f"PIQA: {len(rows)} questions but {len(golds)} labels")
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": gold}
            for r, gold in zip(rows, golds, strict=True)]


def arc_items(raw: str) -> list[dict]:
    items = [json.loads(line) for line in raw.splitlines() if line.strip()]
    for item in items:
        if item["answerKey"] not in item["choices"]["label"]:
            raise click.ClickException(f"ARC item {item['id']}: answer {item['answerKey']} is not a choice")
    return items


# The start of the sentence the harness keeps apart as ctx_b: after the last ". ", beginning in lower case.
_CTX_B = re.compile(r"^(?P<a>.*\.) (?P<b>[a-z][^.]*)$")


def split_context(ctx: str) -> tuple[str, str]:
    """(ctx_a, ctx_b) as the harness's HellaSwag documents have them, rebuilt from the joined context."""
    match = _CTX_B.match(ctx)
    return (match["a"], match["b"]) if match else (ctx, "")


def hellaswag_items(text: str) -> list[dict]:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise click.ClickException(f"HellaSwag text: {len(lines)} lines, not a multiple of 6")
    items = []
    for start in range(0, len(lines), 6):
        head, label, *endings = lines[start:start + 6]
        activity, _, ctx = head.partition(": ")
        ctx_a, ctx_b = split_context(ctx)
        items.append({"activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b, "endings": endings,
                      "label": str(int(label))})
    return items


def build_items(mirror: Path) -> dict[str, list[dict]]:
    raw = {name: [git_show(mirror / repo, path) for path in paths] for name, (repo, paths) in SOURCES.items()}
    return {
        "piqa": piqa_items(raw["piqa"][0].decode("utf-8"), raw["piqa"][1].decode("utf-8")),
        "arc_easy": arc_items(raw["arc_easy"][0].decode("utf-8")),
        "hellaswag": hellaswag_items(bz2.decompress(raw["hellaswag"][0]).decode("utf-8")),
    }


def write_jsonl(items: list[dict], path: Path) -> None:
    """Write to a temporary name and rename, so a half-written file never looks complete."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    tmp.replace(path)


@click.command()
@click.option("--mirror", type=click.Path(path_type=Path, exists=True), required=True,
              help="A folder of repository snapshots: OWNER+NAME/repo for each repository in SOURCES.")
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_OUT, show_default=True)
def main(mirror: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, items in build_items(mirror).items():
        if len(items) != EXPECTED_ITEMS[name]:
            raise click.ClickException(f"{name}: {len(items)} items, expected {EXPECTED_ITEMS[name]}")
        write_jsonl(items, out / f"{name}.jsonl")
        click.echo(f"{out / name}.jsonl: {len(items):,} items")


if __name__ == "__main__":
    main()
