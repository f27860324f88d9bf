"""The demo's promise, as users run it: the README quick start reaches every goal.

`slow`: one seed at two threads is the README command itself (prepare-data, train, eval, chat:
about 4-5 minutes on 2 cores). `python -m dsvl_cli.demo.matrix` runs the whole seed x thread
matrix. Faster tests of the same code path: test_e2e_cli.py (the commands) and test_train.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dsvl_cli.demo import matrix
from dsvl_cli.demo.synthetic import generate_synthetic


def test_cells_pass_only_when_every_goal_and_the_chat_answer_are_met() -> None:
    good = matrix.Cell(0, 2, dict(matrix.GOALS), matrix.CHAT_ANSWER, {})
    assert good.passed
    low = matrix.Cell(0, 2, {**matrix.GOALS, "two_image": 0.89}, matrix.CHAT_ANSWER, {})
    wrong = matrix.Cell(0, 2, dict(matrix.GOALS), "The image with the blue square is the first.")
    missing = matrix.Cell(0, 2, {"single": 1.0}, matrix.CHAT_ANSWER, {})
    assert not any(c.passed for c in (low, wrong, missing))


def test_the_readme_chat_question_is_about_held_out_images_and_has_one_answer(
    tmp_path: Path,
) -> None:
    generate_synthetic(tmp_path, num=matrix.NUM, seed=0, with_models=False)
    names = [Path(p).name for p in matrix.CHAT_IMAGES]
    held_out = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    train = (tmp_path / "train.jsonl").read_text()
    assert not any(name in train for name in names)  # never trained on
    scenes = {
        Path(ref).name: scene
        for row in held_out
        for ref, scene in zip(row["images"], row["meta"]["scenes"], strict=True)
    }
    colour, shape = re.fullmatch(r"Which image has a (\w+) (\w+), .*", matrix.CHAT_PROMPT).groups()
    has = [any((s["colour"], s["shape"]) == (colour, shape) for s in scenes[n]) for n in names]
    colours = [any(s["colour"] == colour for s in scenes[n]) for n in names]
    shapes = [any(s["shape"] == shape for s in scenes[n]) for n in names]
    assert has == [False, True] and colours == [True, True] and shapes == [True, True]
    assert matrix.CHAT_ANSWER.endswith("the second.")
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert matrix.CHAT_PROMPT in readme and f"--num {matrix.NUM}" in readme


@pytest.mark.slow
def test_the_readme_quick_start_meets_the_demo_goals(tmp_path: Path) -> None:
    code = matrix.main(["--work", str(tmp_path), "--seeds", "0", "--threads", "2"])
    report = json.loads((tmp_path / "matrix.json").read_text())
    assert code == 0, report
