"""`dsvl eval`: the original's eval JSON sets to CSV + JSONL, and scores on prepared data."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

import pytest
from rich.console import Console

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from inference_helpers import make_export, steer  # noqa: E402

from dsvl_cli.data.conversation import Conversation, Message, write_jsonl  # noqa: E402
from dsvl_cli.errors import DataError  # noqa: E402
from dsvl_cli.inference.eval_set import CSV_COLUMNS  # noqa: E402
from dsvl_cli.inference.evaluate import exit_code, run_eval  # noqa: E402
from dsvl_cli.inference.generation import GenerationSettings  # noqa: E402
from dsvl_cli.inference.loader import LoadedModel, load_for_inference  # noqa: E402
from dsvl_cli.inference.scoring import (  # noqa: E402
    _prompt,
    generate_batch,
    normalise,
    score_prepared,
    teacher_forced_loss,
)
from dsvl_cli.inference.session import ChatSession  # noqa: E402

SETTINGS = GenerationSettings(max_new_tokens=6, repetition_penalty=1.5)
EVAL_SET = {
    "cats": [
        ["What is in the image?", "images/000000.png"],
        ["And in these three?", "images/000001.png images/000002.png images/000003.png"],
        ["Which one is red?"],
    ],
    "single": [["Describe it.", "images/000004.png"]],
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_export(tmp_path_factory.mktemp("shapes"))
    (root / "set.json").write_text(json.dumps(EVAL_SET), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def loaded(shapes: Path) -> LoadedModel:
    """The export with its LM head biased toward a few words, so answers are readable."""
    return steer(load_for_inference(shapes / "export", device="cpu", dtype="fp32"))


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def read_csv(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.reader(fh))


def test_eval_set_writes_csv_and_jsonl(shapes: Path, tmp_path: Path) -> None:
    summary = run_eval(
        shapes / "export", shapes / "set.json", tmp_path, settings=SETTINGS, device="cpu"
    )
    rows = read_csv(tmp_path / "set.csv")
    assert rows[0] == list(CSV_COLUMNS)
    assert [r[:3] for r in rows[1:]] == [
        ["cats", "images/000000.png", "What is in the image?"],
        ["cats", "images/000001.png images/000002.png images/000003.png", "And in these three?"],
        ["cats", "", "Which one is red?"],  # text-only: empty, not the question again
        ["single", "images/000004.png", "Describe it."],
    ]
    records = [json.loads(line) for line in (tmp_path / "set.jsonl").read_text().splitlines()]
    assert [r["image_numbers"] for r in records] == [[1], [2, 3, 4], [], [1]]
    assert [r["answer"] for r in records] == [r[3] for r in rows[1:]]
    assert [r[4:] for r in rows[1:]] == [["ok", ""]] * 4  # status, error
    assert records[0]["generation"]["max_new_tokens"] == 6 and records[0]["error"] is None
    assert records[0]["image_files"] == [str(shapes / "images/000000.png")]
    assert summary["rounds"] == summary["answered"] == 4 and summary["images"] == 5
    assert summary["tests_failed"] == 0 and exit_code(summary) == 0
    # Every test is its own conversation: answers equal a fresh session per test.
    model = load_for_inference(shapes / "export", device="cpu")
    expected = []
    for rounds in EVAL_SET.values():
        session = ChatSession.from_loaded(model, SETTINGS)
        for rnd in rounds:
            images = [shapes / p for p in rnd[1].split()] if len(rnd) == 2 else []
            expected.append(session.ask(rnd[0], images).text)
    assert [r["answer"] for r in records] == expected


def test_eval_set_image_root_and_limit(shapes: Path, tmp_path: Path) -> None:
    data = tmp_path / "elsewhere" / "mine.json"
    data.parent.mkdir()
    data.write_text(json.dumps(EVAL_SET), encoding="utf-8")
    # Nothing under the JSON's folder: no test can run, so the set is refused before the model
    # loads, naming the first image and every place tried.
    tried = rf"tried {data.parent}/images/000000.png, {data.parent}/000000.png; set --image-root"
    with pytest.raises(DataError, match=r"mine.json: no test can run \(1 more .*" + tried):
        run_eval(shapes / "export", data, tmp_path / "out", settings=SETTINGS, device="cpu")
    console = quiet()
    run_eval(
        shapes / "export",
        data,
        tmp_path / "out",
        limit=1,
        image_root=shapes,
        settings=SETTINGS,
        device="cpu",
        console=console,
    )
    assert [r[0] for r in read_csv(tmp_path / "out" / "mine.csv")[1:]] == ["cats"] * 3
    out = tmp_path / "out"
    printed = console.file.getvalue()  # type: ignore[attr-defined]
    assert f"results: {out / 'mine.csv'}, {out / 'mine.jsonl'}" in printed


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"t": [["q", "a.png", "extra"]]}, "test 't': round 1: a round must be"),
        ({"t": []}, "test 't': must be a non-empty list"),
        (["not", "a", "mapping"], "expected an object mapping test name"),
    ],
)
def test_eval_set_format_errors(tmp_path: Path, content: object, message: str) -> None:
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(content), encoding="utf-8")
    with pytest.raises(DataError, match=message):
        run_eval(tmp_path / "no-model", data, tmp_path / "out")


def test_data_kind_is_checked_before_the_model_loads(tmp_path: Path) -> None:
    (tmp_path / "set.txt").write_text("{}", encoding="utf-8")
    with pytest.raises(DataError, match=r"expected an eval set \(.json"):
        run_eval(tmp_path / "no-model", tmp_path / "set.txt", tmp_path / "out")
    with pytest.raises(DataError, match="no such file"):
        run_eval(tmp_path / "no-model", tmp_path / "absent.json", tmp_path / "out")


def prepared_set(shapes: Path) -> list[Conversation]:
    def conv(id_: str, turns: list[str], images: list[str], meta: dict) -> Conversation:
        roles = ["user", "assistant"] * len(turns)
        messages = [Message(r, t) for r, t in zip(roles, turns, strict=False)]
        return Conversation(messages, images, id=id_, source="hand", meta=meta)

    return [
        conv("s", ["<image>\nWhat colour is the square?", "red"], ["images/000000.png"],
             {"type": "single", "answer": "red"}),
        conv("t", ["<image>\n<image>\nWhich image has a circle?", "the first"],
             ["images/000001.png", "images/000002.png"], {"type": "two_image", "answer": "?"}),
        conv("m", ["<image>\nWhat colour?", "blue", "<image>\nAnd here?", "green"],
             ["images/000003.png", "images/000004.png"], {"type": "multi_round", "answer": "?"}),
        conv("x", ["<image>\nWhat colour?", "red"], ["images/missing.png"],
             {"type": "single", "answer": "red"}),
        conv("n", ["<image>\nDescribe it.", "a red square"], ["images/000005.png"],
             {"type": "single"}),
    ]  # fmt: skip


def test_scoring_accuracy_and_loss(loaded: LoadedModel, shapes: Path, tmp_path: Path) -> None:
    convs = prepared_set(shapes)
    # What the model answers, one conversation at a time; then set references around it.
    alone = {c.id: generate_batch(loaded, [_prompt(loaded, c, shapes)], SETTINGS)[0][0]
             for c in convs if c.id in ("s", "t", "m")}  # fmt: skip
    assert all(alone.values())
    convs[0].meta["answer"] = alone["s"].upper() + "."  # matches after normalisation
    convs[1].meta["answer"] = "certainly not"
    convs[2].meta["answer"] = f"  {alone['m']}!"
    metrics = score_prepared(
        loaded, shapes / "hand.jsonl", convs, shapes, tmp_path, 3, SETTINGS, quiet()
    )
    acc = metrics["accuracy"]
    assert (acc["correct"], acc["total"]) == (2, 3)
    assert {k: v["accuracy"] for k, v in acc["by_type"].items()} == {
        "multi_round": 1.0,
        "single": 1.0,
        "two_image": 0.0,
    }
    assert metrics["accuracy_skipped"] == {"image_missing": 1}
    predictions = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    # Batched (left-padded, 3 per batch) answers equal one-at-a-time answers, in input order.
    answered = [p for p in predictions if p["error"] is None]
    assert [(p["id"], p["prediction"]) for p in answered] == list(alone.items())
    # The sample with a missing image fails for loss and for accuracy: both listed, with reason.
    failed = [(p["id"], p["stage"], p["reason"]) for p in predictions if p["error"] is not None]
    assert failed == [("x", "loss", "image_missing"), ("x", "accuracy", "image_missing")]
    assert metrics["failures"] == 2 and exit_code(metrics) == 1
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    loss = metrics["loss"]
    assert loss["skipped"] == {"image_missing": 1} and loss["samples"] == 4
    assert loss["perplexity"] == pytest.approx(math.exp(loss["loss"]))
    one_by_one = teacher_forced_loss(loaded, convs, shapes, batch_size=1)
    assert one_by_one["loss"] == pytest.approx(loss["loss"], rel=1e-5)
    assert one_by_one["tokens"] == loss["tokens"] > 0
    assert set(loss["by_type"]) == {"single", "two_image", "multi_round"}


def test_normalise() -> None:
    assert normalise("  The  First.\n") == "the first"
    assert normalise("Red!?") == "red"
    assert normalise("3.5") == "3.5"


def test_eval_prepared_file_end_to_end(shapes: Path, tmp_path: Path) -> None:
    write_jsonl(shapes / "hand.jsonl", prepared_set(shapes))
    console = quiet()
    metrics = run_eval(
        shapes / "export",
        shapes / "hand.jsonl",
        tmp_path,
        limit=2,
        batch_size=2,
        settings=SETTINGS,
        device="cpu",
        console=console,
    )
    assert metrics["conversations"] == 2 and metrics["accuracy"]["total"] == 2
    printed = console.file.getvalue()  # type: ignore[attr-defined]
    assert f"results: {tmp_path / 'metrics.json'}, {tmp_path / 'predictions.jsonl'}" in printed
    assert math.isfinite(metrics["loss"]["loss"])
    assert (tmp_path / "metrics.json").is_file()
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 2
