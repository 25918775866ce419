"""Every `from streamprune... import name` in tools/ (top level or inside a function) still resolves.

The benchmarks are not run by the suite, so a module moved in a refactor would otherwise only show up
when someone runs the benchmark an hour into a session.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

TOOLS = sorted((Path(__file__).resolve().parents[1] / "tools").glob("*.py"))


def streamprune_imports(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "streamprune":
            pairs += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            pairs += [(alias.name, "") for alias in node.names if alias.name.split(".")[0] == "streamprune"]
    return pairs


@pytest.mark.parametrize("tool", TOOLS, ids=lambda p: p.name)
def test_tool_imports_resolve(tool: Path):
    for module_name, name in streamprune_imports(tool):
        module = importlib.import_module(module_name)
        if name:
            assert hasattr(module, name) or importlib.util.find_spec(f"{module_name}.{name}"), \
                f"{tool.name}: from {module_name} import {name}"
