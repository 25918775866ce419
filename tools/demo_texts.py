"""Rebuild the demo's shipped texts (streamprune/data/*.txt) from Project Gutenberg plain-text files.

The Gutenberg files come from the GITenberg mirrors on GitHub (one repository per book, see
streamprune/data/README.md for the list). This script keeps only the book's own text: the Project
Gutenberg header, licence and footer are cut (the books themselves are public domain; the licence
covers the "Project Gutenberg" trademark, which the shipped files therefore do not use), as are
illustration, side-note and footnote markers. Hard-wrapped lines are joined into paragraphs, so
the model sees prose as it sees it on the web; indented blocks (verse, tables) keep their lines.

    python tools/demo_texts.py SRC_DIR      # SRC_DIR holds the .txt files named in SOURCES

Each source contributes the paragraphs from its `start` line until `chars` characters are reached.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "streamprune" / "data"


@dataclass(frozen=True)
class Source:
    file: str          # Gutenberg plain-text file name (as in the GITenberg repository)
    start: str         # first line of the part taken (after the front matter)
    chars: int         # about how many characters to take (cut at a paragraph end)
    skip_to: str | None = None  # optional later line to jump to before taking more


CALIBRATION = [  # varied prose: travel, essay on music, legends, folklore
    Source("18304-8.txt", "Though much has been written of the South", 36_000),
    Source("17474-8.txt", "This book has a purpose, which is as simple as it is plain", 36_000),
    Source("20170-8.txt", "THE MERMAID OF ZENNOR", 30_000),
    Source("52834-0.txt", "The observance of particular days and seasons", 36_000),
]
EVALUATION = [Source("14881-8.txt", "GRETCHEN'S VIOLIN.", 105_000)]

_DROP = re.compile(r"^\[(Illustration|Sidenote|Footnote|Transcriber)", re.IGNORECASE)


def read_gutenberg(path: Path) -> list[str]:
    """The book's lines between the Gutenberg START and END markers, as Unicode."""
    raw = path.read_bytes()
    text = raw.decode("utf-8-sig") if path.stem.endswith("-0") else raw.decode("latin-1")
    lines = text.replace("\r\n", "\n").split("\n")
    first = next(i for i, line in enumerate(lines) if line.startswith("***START") or line.startswith("*** START"))
    last = next(i for i, line in enumerate(lines) if line.startswith("***END") or line.startswith("*** END"))
    return lines[first + 1:last]


def paragraphs(lines: list[str]) -> list[str]:
    """Blank-line separated blocks, markers dropped, wrapped prose joined into one line."""
    blocks, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line.rstrip())
            continue
        if current:
            blocks.append(current)
            current = []
    out = []
    for block in blocks:
        if _DROP.match(block[0].strip()) or set("".join(block).replace(" ", "")) <= {"*"}:
            continue
        if any(line.startswith(" ") for line in block):
            text = "\n".join(line.strip() for line in block)
        else:
            text = " ".join(line.strip() for line in block)
        text = text.replace("_", "")
        if text.strip():
            out.append(text)
    return out


def take(source: Source, src_dir: Path) -> str:
    lines = read_gutenberg(src_dir / source.file)
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(source.start))
    kept, size = [], 0
    for para in paragraphs(lines[start:]):
        kept.append(para)
        size += len(para) + 2
        if size >= source.chars:
            break
    return "\n\n".join(kept)


def main(src_dir: str) -> None:
    src = Path(src_dir)
    calibration = "\n\n".join(take(s, src) for s in CALIBRATION) + "\n"
    evaluation = "\n\n".join(take(s, src) for s in EVALUATION) + "\n"
    (DATA / "demo_calibration.txt").write_text(calibration, encoding="utf-8")
    (DATA / "demo_eval.txt").write_text(evaluation, encoding="utf-8")
    for name in ("demo_calibration.txt", "demo_eval.txt"):
        print(f"{name}: {(DATA / name).stat().st_size:,} bytes")


if __name__ == "__main__":
    main(sys.argv[1])
