"""Prepare the held-out evaluation texts used by tools/bench_quality.py (never committed to git).

Calibration in the benchmarks uses WikiText-2 *validation* (encyclopaedic prose, ../shared/data).
Quality is reported on text from other sources and of other kinds, none of it seen in calibration:

- books: a little-known 1909 novel, "Katrine" by Elinor Macartney Lane (Project Gutenberg #14263).
  GITenberg/Katrine--A-Novel_14263 @ cda5284, 14263.txt. Public domain in the US.
- news: 2006 science news of the Australian Broadcasting Commission (the NLTK "abc" corpus).
  nltk/nltk_data @ 5db857e, packages/corpora/abc.zip, abc/science.txt. (c) ABC, distributed with
  NLTK for research; used here for measurement only, never redistributed.
- qa: instruction-style questions and worked answers (GSM8K test split).
  openai/grade-school-math @ 3101c7d, grade_school_math/data/test.jsonl. MIT licence.

The raw files come from snapshots of those public repositories (the maintainers' `fetch` tool puts
them under /work/.mirror/OWNER+NAME/...); point `--mirror` at that folder. Cleaning: the Gutenberg
licence header and footer are cut; the GSM8K calculator annotations `<<...>>` are dropped and each
item becomes "Question: ...\\nAnswer: ..."; the news text is used as is.

    python tools/eval_texts.py --mirror /work/.mirror --out ~/.cache/streamprune/eval-texts
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import zipfile
from pathlib import Path

import click

SOURCES = {
    "books": ("GITenberg+Katrine--A-Novel_14263", "14263.txt"),
    "news": ("nltk+nltk_data", "packages/corpora/abc.zip"),
    "qa": ("openai+grade-school-math", "grade_school_math/data/test.jsonl"),
}


def git_show(repo: Path, path: str) -> bytes:
    git_dir = repo / "repo"
    if (git_dir / ".git").is_dir():
        git_dir = git_dir / ".git"
    return subprocess.check_output(["git", f"--git-dir={git_dir}", "show", f"HEAD:{path}"])


def clean_gutenberg(raw: str) -> str:
    start = re.search(r"^\*\*\* ?START OF.*$", raw, flags=re.M)
    end = re.search(r"^\*\*\* ?END OF.*$", raw, flags=re.M)
    body = raw[start.end() if start else 0: end.start() if end else len(raw)]
    return body.replace("\r\n", "\n").strip() + "\n"


def clean_abc(raw: bytes) -> str:
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        return archive.read("abc/science.txt").decode("utf-8", errors="replace")


def clean_gsm8k(raw: str) -> str:
    items = [json.loads(line) for line in raw.splitlines() if line.strip()]
    blocks = []
    for item in items:
        answer = re.sub(r"<<[^>]*>>", "", item["answer"]).replace("####", "The answer is")
        blocks.append(f"Question: {item['question'].strip()}\nAnswer: {answer.strip()}")
    return "\n\n".join(blocks) + "\n"


@click.command()
@click.option("--mirror", type=click.Path(path_type=Path, exists=True), default=Path("/work/.mirror"),
              show_default=True, help="Folder holding the repository snapshots named in SOURCES.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("~/.cache/streamprune/eval-texts").expanduser(),
              show_default=True)
def main(mirror: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    raw = {name: git_show(mirror / repo, path) for name, (repo, path) in SOURCES.items()}
    texts = {
        "books": clean_gutenberg(raw["books"].decode("utf-8", errors="replace")),
        "news": clean_abc(raw["news"]),
        "qa": clean_gsm8k(raw["qa"].decode("utf-8")),
    }
    for name, text in texts.items():
        (out / f"{name}.txt").write_text(text, encoding="utf-8")
        click.echo(f"{out / name}.txt: {len(text):,} characters")


if __name__ == "__main__":
    main()
