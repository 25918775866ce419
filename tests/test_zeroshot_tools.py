"""tools/zeroshot_data.py and tools/bench_zeroshot.py: the parts that need neither lm_eval nor a model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

# tools/ is not a package: other scripts import it this way, so the test does too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_zeroshot as bz  # noqa: E402
import zeroshot_data as zd  # noqa: E402


def test_piqa_items_pair_questions_with_labels():
    questions = '{"goal": "g1", "sol1": "a", "sol2": "b"}\n{"goal": "g2", "sol1": "c", "sol2": "d"}\n'
    items = zd.piqa_items(questions, "1\n0\n")
    assert items == [{"goal": "g1", "sol1": "a", "sol2": "b", "label": 1},
                     {"goal": "g2", "sol1": "c", "sol2": "d", "label": 0}]
    with pytest.raises(click.ClickException, match="2 questions but 1 labels"):
        zd.piqa_items(questions, "1\n")


def test_arc_items_reject_an_answer_that_is_not_a_choice():
    good = {"id": "q1", "question": "?", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "B"}
    assert zd.arc_items(json.dumps(good)) == [good]
    with pytest.raises(click.ClickException, match="q1"):
        zd.arc_items(json.dumps({**good, "answerKey": "C"}))


def test_split_context_rebuilds_ctx_b_only_for_a_lower_case_fragment():
    assert zd.split_context("A man is sitting on a roof. he") == ("A man is sitting on a roof.", "he")
    assert zd.split_context("Stir the pot. Then wait.") == ("Stir the pot. Then wait.", "")
    assert zd.split_context("no full stop here") == ("no full stop here", "")


def test_hellaswag_items_read_six_line_blocks():
    text = "Roof work: A man is on a roof. he\n2\nend0\nend1\nend2\nend3\nCooking: Boil water.\n0\na\nb\nc\nd\n"
    items = zd.hellaswag_items(text)
    assert items[0] == {"activity_label": "Roof work", "ctx_a": "A man is on a roof.", "ctx_b": "he",
                        "endings": ["end0", "end1", "end2", "end3"], "label": "2"}
    assert items[1]["ctx_b"] == "" and items[1]["label"] == "0"
    with pytest.raises(click.ClickException, match="not a multiple of 6"):
        zd.hellaswag_items("a: b\n1\nx\n")


def scores(**per_item: list[int]) -> dict:
    return {task: {"per_item": values, "acc": sum(values) / len(values), "acc_norm": sum(values) / len(values)}
            for task, values in per_item.items()}


def test_headline_averages_each_tasks_own_metric():
    row = {"arc_easy": {"acc": 0.6, "acc_norm": 0.1}, "piqa": {"acc": 0.7, "acc_norm": 0.1},
           "hellaswag": {"acc": 0.1, "acc_norm": 0.5}}
    assert bz.headline(row) == pytest.approx(0.6)


def test_retention_interval_is_paired():
    dense = scores(arc_easy=[1, 0] * 50, piqa=[1, 1, 0, 0] * 25)
    # The same items right and wrong: every resample gives a ratio of exactly 1.
    assert bz.retention_interval(dense, dense, iters=200) == (1.0, 1.0)
    # One dense-correct item in ten lost: the ratio stays below 1, and the interval brackets the point value.
    worse = {task: {"per_item": [0 if i % 10 == 0 else v for i, v in enumerate(s["per_item"])]}
             for task, s in dense.items()}
    low, high = bz.retention_interval(dense, worse, iters=500)
    point = (sum(worse["arc_easy"]["per_item"]) + sum(worse["piqa"]["per_item"])) / 100
    assert low <= point <= high < 1.0
    with pytest.raises(click.ClickException, match="different numbers of items"):
        bz.retention_interval(dense, scores(arc_easy=[1], piqa=[1]))


def test_json_round_trip_keeps_per_item_scores(tmp_path):
    rows = [{"model": "dense", "path": "/m", "scores": scores(piqa=[1, 0, 1]), "mean": 2 / 3}]
    path = tmp_path / "z.json"
    bz.write_json(path, {"tasks": ["piqa"], "limit": 3, "rows": rows})
    assert json.loads(path.read_text())["rows"][0]["scores"]["piqa"]["per_item"] == "101"
    assert bz.load_previous(path, ["piqa"], 3)[0]["scores"]["piqa"]["per_item"] == [1, 0, 1]
    with pytest.raises(click.ClickException, match="another --limit"):
        bz.load_previous(path, ["piqa"], 4)
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("args, message", [
    (["--tasks", "piqa mmlu"], "unknown task(s) mmlu"),
    (["--resume"], "--resume needs --json"),
    (["--model-dir", "/nonexistent"], "is not a model folder"),
])
def test_cli_rejects_bad_input_in_one_line(args, message, tmp_path):
    result = CliRunner().invoke(bz.main, args + ["--data-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
