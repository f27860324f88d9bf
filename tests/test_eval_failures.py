"""`dsvl eval` when part of the input is bad: the unit fails alone, visibly, and the exit says so.

The fixture mimics the original DeepSpeed-VisualChat eval sets: several multi-round,
multi-image tests whose paths read ``./eval/eval_data/images/...`` (relative to the folder the
original's script ran in), and a 0-byte PNG used by one test (the original's comprehensive set
ships three of them, used by 3 of its 11 tests).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from inference_helpers import make_export  # noqa: E402

from dsvl_cli.data.conversation import Conversation, Message, write_jsonl  # noqa: E402
from dsvl_cli.errors import ConfigError, DataError  # noqa: E402
from dsvl_cli.inference.evaluate import exit_code, run_eval  # noqa: E402
from dsvl_cli.inference.generation import GenerationSettings  # noqa: E402

SETTINGS = GenerationSettings(max_new_tokens=4)
IMAGES = "./eval/eval_data/images"
EMPTY = "zootopia/z1.png"  # 0 bytes, as in the original's set
ORIGINAL_SET = {
    "cat_images": [
        ["Please describe the image in detail.", f"{IMAGES}/cats/1.png"],
        ["Please describe the image in detail.", f"{IMAGES}/cats/2.png"],
        ["Are the colors of the two cats the same?"],
    ],
    "counting_people": [
        ["Count the people in both images.", f"{IMAGES}/friends/a.png {IMAGES}/friends/b.png"],
        ["Are they the same group of people?"],
    ],
    "zootopia_adventures": [
        ["Please describe the image in detail.", f"{IMAGES}/zootopia/z2.png"],
        ["And this one?", f"{IMAGES}/{EMPTY}"],
        ["Name the movie."],
    ],
    "cats_again": [["Which cat is in the sunshine?", f"{IMAGES}/cats/2.png {IMAGES}/cats/1.png"]],
}
GOOD_TESTS = ["cat_images", "counting_people", "cats_again"]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny export, and the original's layout: DeepSpeed-VisualChat/eval/eval_data/..."""
    root = make_export(tmp_path_factory.mktemp("original"))
    data = root / "DeepSpeed-VisualChat" / "eval" / "eval_data"
    pictures = sorted((root / "images").glob("*.png"))
    names = ["cats/1.png", "cats/2.png", "friends/a.png", "friends/b.png", "zootopia/z2.png"]
    for name, picture in zip(names, pictures, strict=False):
        (data / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(picture, data / "images" / name)
    (data / "images" / EMPTY).write_bytes(b"")
    (data / "eval_comprehensive.json").write_text(json.dumps(ORIGINAL_SET), encoding="utf-8")
    return root


def eval_set(work: Path) -> Path:
    return work / "DeepSpeed-VisualChat" / "eval" / "eval_data" / "eval_comprehensive.json"


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def printed(console: Console) -> str:
    return console.file.getvalue()  # type: ignore[attr-defined]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def dsvl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "dsvl_cli", *args], cwd=cwd, capture_output=True, text=True, env=env
    )


def test_a_bad_image_fails_only_its_test(work: Path, tmp_path: Path) -> None:
    """Through the command: the other tests' rows, the failed test listed everywhere, exit 1."""
    result = dsvl(
        "eval", "export", "--data", str(eval_set(work)), "--out", str(tmp_path),
        "--max-new-tokens", "4", "--device", "cpu", cwd=work,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    empty = work / "DeepSpeed-VisualChat/eval/eval_data/images" / EMPTY
    reason = f"round 2: image {empty}: empty_file (0 bytes)"
    rows = read_csv(tmp_path / "eval_comprehensive.csv")
    assert [(r["test_name"], r["status"]) for r in rows] == [
        ("cat_images", "ok"), ("cat_images", "ok"), ("cat_images", "ok"),
        ("counting_people", "ok"), ("counting_people", "ok"),
        ("zootopia_adventures", "not_run"), ("zootopia_adventures", "not_run"),
        ("zootopia_adventures", "not_run"),
        ("cats_again", "ok"),
    ]  # fmt: skip
    assert all(r["answer"] and not r["error"] for r in rows if r["status"] == "ok")
    assert {r["error"] for r in rows if r["status"] != "ok"} == {f"not run: {reason}"}
    assert rows[3]["image_path"] == f"{IMAGES}/friends/a.png {IMAGES}/friends/b.png"  # as written
    records = read_jsonl(tmp_path / "eval_comprehensive.jsonl")
    assert [r["status"] for r in records] == [r["status"] for r in rows]
    assert [r["error"] for r in records][5:8] == [f"not run: {reason}"] * 3
    assert records[5]["answer"] is None and records[0]["error"] is None
    found = [str(empty.parent.parent / "friends" / n) for n in ("a.png", "b.png")]
    assert records[3]["image_files"] == found  # where the rule found them
    assert records[3]["image_numbers"] == [1, 2] and records[8]["image_numbers"] == [1, 2]
    # The printed summary counts the failure and lists the test with its reason.
    assert re.search(r"tests_failed\s+│\s+1 │", result.stdout)
    assert f"failed tests (1):\n  zootopia_adventures: {reason}\n" in result.stdout
    assert f"results: {tmp_path / 'eval_comprehensive.csv'}" in result.stdout
    assert "test 'zootopia_adventures' failed" in result.stderr  # the log says it as it happens


def test_good_tests_answer_as_if_the_bad_one_were_absent(work: Path, tmp_path: Path) -> None:
    console = quiet()
    summary = run_eval(
        work / "export", eval_set(work), tmp_path / "all", settings=SETTINGS, device="cpu",
        console=console,
    )  # fmt: skip
    assert summary["tests"] == 4 and summary["tests_failed"] == 1 and exit_code(summary) == 1
    assert (summary["rounds"], summary["answered"], summary["rounds_not_run"]) == (9, 6, 3)
    assert list(summary["failed_tests"]) == ["zootopia_adventures"]
    good = tmp_path / "good.json"
    good.write_text(json.dumps({k: ORIGINAL_SET[k] for k in GOOD_TESTS}), encoding="utf-8")
    alone = run_eval(
        work / "export", good, tmp_path / "good", image_root=eval_set(work).parent,
        settings=SETTINGS, device="cpu", console=quiet(),
    )  # fmt: skip
    assert exit_code(alone) == 0 and alone["failed_tests"] == {}
    answers = [r["answer"] for r in read_jsonl(tmp_path / "all/eval_comprehensive.jsonl")]
    assert [a for a in answers if a is not None] == [
        r["answer"] for r in read_jsonl(tmp_path / "good/good.jsonl")
    ]


def test_image_root_may_point_at_the_images_folder(work: Path, tmp_path: Path) -> None:
    copied = tmp_path / "sets" / "eval_comprehensive.json"  # away from the images
    copied.parent.mkdir()
    shutil.copy(eval_set(work), copied)
    # Default root (the JSON's folder) holds no images: refused before the model loads, with
    # the first path that failed and every place tried, exit 2.
    result = dsvl("eval", "export", "--data", str(copied), "--out", str(tmp_path / "o"), cwd=work)
    assert result.returncode == 2 and not (tmp_path / "o").exists()
    tails = ["eval/eval_data/images/cats/1.png", "eval_data/images/cats/1.png",
             "images/cats/1.png", "cats/1.png", "1.png"]  # fmt: skip
    tried = ", ".join(str(copied.parent / t) for t in tails)
    assert (
        f"{copied}: no test can run (3 more test(s) cannot run either); test 'cat_images': round "
        f"1: image '{IMAGES}/cats/1.png': no such file; tried {tried}; set --image-root"
    ) in " ".join(result.stderr.split())
    data = eval_set(work).parent
    for root in (data / "images", data, work / "DeepSpeed-VisualChat"):
        summary = run_eval(
            work / "export", copied, tmp_path / root.name, image_root=root, settings=SETTINGS,
            device="cpu", console=quiet(),
        )  # fmt: skip
        assert summary["answered"] == 6 and list(summary["failed_tests"]) == ["zootopia_adventures"]


def test_a_full_context_is_visible_in_every_output(work: Path, tmp_path: Path) -> None:
    long_question = "Describe every detail of the picture again. " * 80  # over 512 tokens alone
    data = tmp_path / "overflow.json"
    content = {
        "fits": [["Describe it.", "images/000000.png"]],
        "too_long": [["Describe it.", "images/000001.png"], [long_question], ["Thanks."]],
    }
    data.write_text(json.dumps(content), encoding="utf-8")
    for overflow, advice in (
        ("error", "lower --max-new-tokens, or --overflow drop_oldest"),
        ("drop_oldest", "the round alone does not fit: lower --max-new-tokens"),
    ):
        console, out = quiet(), tmp_path / overflow
        summary = run_eval(
            work / "export", data, out, image_root=work, settings=SETTINGS, device="cpu",
            overflow=overflow, console=console,  # type: ignore[arg-type]
        )  # fmt: skip
        rows = read_csv(out / "overflow.csv")
        assert [r["status"] for r in rows] == ["ok", "ok", "failed", "not_run"]
        assert rows[2]["error"].startswith("context full: ") and rows[2]["error"].endswith(advice)
        assert rows[2]["answer"] == "" and rows[3]["error"] == "not run: round 2 failed"
        records = read_jsonl(out / "overflow.jsonl")
        assert [r["error"] for r in records][2:] == [rows[2]["error"], rows[3]["error"]]
        assert records[2]["answer"] is None and records[2]["status"] == "failed"
        counts = summary["rounds_failed"], summary["rounds_not_run"], summary["tests_failed"]
        assert counts == (1, 1, 1) and exit_code(summary) == 1
        assert summary["failed_tests"] == {"too_long": f"round 2: {rows[2]['error']}"}
        assert f"too_long: round 2: {rows[2]['error']}" in printed(console)


def test_usage_errors_come_before_anything_runs(tmp_path: Path) -> None:
    data = tmp_path / "set.json"
    data.write_text(json.dumps({"t": [["q"]]}), encoding="utf-8")
    with pytest.raises(ConfigError, match="--overflow 'oldest': choose one of error, drop_oldest"):
        run_eval(tmp_path / "no-model", data, tmp_path / "out", overflow="oldest")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- prepared JSONL


def conversation(id_: str, images: list[str], answer: str = "red") -> Conversation:
    question = "\n".join(["<image>"] * len(images) + ["What colour is the square?"])
    messages = [Message("user", question), Message("assistant", answer)]
    return Conversation(messages, images, id=id_, source="hand", meta={"answer": answer})


def test_prepared_bad_samples_are_counted_and_the_rest_scored(work: Path, tmp_path: Path) -> None:
    data = tmp_path / "held_out.jsonl"
    write_jsonl(data, [
        conversation("good", [f"{IMAGES}/cats/1.png"]),
        conversation("empty", [f"{IMAGES}/{EMPTY}"]),
        conversation("absent", [f"{IMAGES}/cats/none.png"]),
        conversation("two", [f"{IMAGES}/cats/2.png", f"{IMAGES}/friends/a.png"]),
    ])  # fmt: skip
    with open(data, "a", encoding="utf-8") as fh:
        fh.write("{not json\n" + json.dumps({"id": "no messages"}) + "\n")
    console = quiet()
    images = eval_set(work).parent / "images"
    metrics = run_eval(
        work / "export", data, tmp_path / "out", image_root=images, settings=SETTINGS,
        device="cpu", console=console,
    )  # fmt: skip
    assert metrics["samples"] == 6 and metrics["conversations"] == 2
    assert metrics["loss"]["samples"] == 2 and metrics["accuracy"]["total"] == 2
    failed = [(f["line"], f["stage"], f["reason"]) for f in metrics["failed_samples"]]
    assert failed == [
        (2, "images", "image_empty_file"), (3, "images", "image_missing"),
        (5, "read", "bad_json"), (6, "read", "bad_record"),
    ]  # fmt: skip
    assert metrics["failures"] == 4 and exit_code(metrics) == 1
    absent = metrics["failed_samples"][1]["error"]
    assert absent.startswith(f"image '{IMAGES}/cats/none.png': no such file; tried {images}/")
    predictions = read_jsonl(tmp_path / "out/predictions.jsonl")
    assert [p["id"] for p in predictions if p["error"] is None] == ["good", "two"]
    assert [p["line"] for p in predictions if p["error"] is not None] == [2, 3, 5, 6]
    assert json.loads((tmp_path / "out/metrics.json").read_text())["failures"] == 4
    text = printed(console)
    assert "failed: 4 sample(s) not scored: bad_json (read) 1, bad_record (read) 1, " in text
    assert f"  {absent}\n" in text
    # Nothing left to score: refused before the model loads, naming the first failure.
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [conversation("absent", ["cats/none.png"])])
    with pytest.raises(
        DataError,
        match=r"bad.jsonl: no conversation can be scored \(1 read\); "
        r"line 1: image 'cats/none.png': no such file; .*set --image-root",
    ):
        run_eval(tmp_path / "no-model", bad, tmp_path / "o", image_root=images)
