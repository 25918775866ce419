"""Rules about the code's shape (issue #25) that ruff does not check."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "streamprune"
MAX_PARAMETERS = 8
# Over the limit today and being reworked on other branches of #25; a name here is only skipped, so the
# entry can go once its refactor lands.
PENDING: set[str] = set()


def _is_click_command(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """`@main.command(...)` / `@click.command()`: click maps every option to a parameter, so those are exempt."""
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(target, ast.Attribute) and target.attr in ("command", "group"):
            return True
    return False


def _parameter_count(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Positional and keyword-only parameters, not counting self / cls."""
    args = node.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    return len(names) - (names[:1] in (["self"], ["cls"]))


def _functions() -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield f"{path.relative_to(PACKAGE)}:{node.name}", node


def test_no_function_takes_more_than_eight_parameters():
    over = [f"{name} ({_parameter_count(node)})" for name, node in _functions()
            if _parameter_count(node) > MAX_PARAMETERS and not _is_click_command(node) and name not in PENDING]
    assert not over, f"group related parameters into a dataclass or split the function: {', '.join(over)}"


def test_the_check_exempts_click_commands_and_does_not_count_self():
    functions = dict(_functions())
    assert _is_click_command(functions["cli.py:eval_command"])
    assert not _is_click_command(functions["evaluation.py:load_eval_text"])
    assert _parameter_count(functions["evaluation.py:evaluate"]) == 6
    assert _parameter_count(functions["evaluation.py:log_probs"]) == 2  # StreamedModel.log_probs(self, hidden, head)
