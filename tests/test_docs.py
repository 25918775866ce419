"""Citations of the specification: every docs/method.md heading cited (in double quotes) in the code, tests and
docs exists, and nothing cites a method file outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r'docs/method\.md "([^"]+)"')


def _sources() -> list[Path]:
    files = [p for folder in ("streamprune", "tests", "tools") for p in (ROOT / folder).rglob("*.py")]
    return files + sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


def test_every_cited_method_heading_exists():
    headings = {line.lstrip("#").strip() for line in (ROOT / "docs" / "method.md").read_text().splitlines()
                if line.startswith("#")}
    cited = {}
    for path in _sources():
        for name in CITATION.findall(path.read_text(encoding="utf-8")):
            cited.setdefault(name, path.relative_to(ROOT))
    assert len(cited) >= 6  # the code does cite the specification
    missing = {name: str(where) for name, where in cited.items() if name not in headings}
    assert not missing, f"cited headings missing from docs/method.md: {missing}"


def test_nothing_cites_a_method_file_outside_the_repository():
    offenders = [str(p.relative_to(ROOT)) for p in _sources()
                 if p.name != "test_docs.py" and "METHOD" + ".md" in p.read_text(encoding="utf-8")]
    assert offenders == []
