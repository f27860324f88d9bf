"""The demo's promise, as users run it: the README quick start reaches every goal.

`slow`: one seed at two threads is the README command itself (prepare-data, train, eval, chat:
about 4-5 minutes on 2 cores). `python -m dsvl_cli.demo.matrix` runs the whole seed x thread
matrix. Faster tests of the same code path: test_e2e_cli.py (the commands) and test_train.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsvl_cli.demo import matrix


def test_cells_pass_only_when_every_goal_and_the_chat_answer_are_met() -> None:
    good = matrix.Cell(0, 2, dict(matrix.GOALS), matrix.CHAT_ANSWER, {})
    assert good.passed
    low = matrix.Cell(0, 2, {**matrix.GOALS, "two_image": 0.89}, matrix.CHAT_ANSWER, {})
    wrong = matrix.Cell(0, 2, dict(matrix.GOALS), "The image with the yellow square is the second.")
    missing = matrix.Cell(0, 2, {"single": 1.0}, matrix.CHAT_ANSWER, {})
    assert not any(c.passed for c in (low, wrong, missing))


@pytest.mark.slow
def test_the_readme_quick_start_meets_the_demo_goals(tmp_path: Path) -> None:
    code = matrix.main(["--work", str(tmp_path), "--seeds", "0", "--threads", "2"])
    report = json.loads((tmp_path / "matrix.json").read_text())
    assert code == 0, report
