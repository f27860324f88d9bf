"""prepare-data on awkward inputs: byte-order marks, file URIs, blank caption candidates, a source
that keeps nothing (an error, not a success), and image checks whatever the worker count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dsvl_cli.data.conversation import read_jsonl
from dsvl_cli.data.prepare import PrepareOptions, prepare_data
from dsvl_cli.errors import DataError

BOM = b"\xef\xbb\xbf"


def llava_records(images: list[str]) -> list[dict]:
    return [
        {"id": f"r{i}", "image": image, "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "a colour"}]}
        for i, image in enumerate(images)
    ]  # fmt: skip


def save_image(path: Path, colour: str = "red") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 24), colour).save(path)
    return path


def test_a_json_file_with_a_byte_order_mark_keeps_every_record(tmp_path: Path) -> None:
    save_image(tmp_path / "raw/a.png")
    ann = tmp_path / "raw/llava.json"
    text = json.dumps(llava_records(["a.png"] * 3), indent=2)  # 44 lines, as the reported file
    ann.write_bytes(BOM + text.encode("utf-8"))
    [result] = prepare_data(["llava_json"], PrepareOptions(None, tmp_path / "out", files=[ann]))
    assert result.kept == 3 and not result.drops
    jsonl = tmp_path / "out/llava_json.jsonl"
    jsonl.write_bytes(BOM + jsonl.read_bytes())  # the prepared-data reader takes one too
    assert len(list(read_jsonl(jsonl))) == 3


def test_a_source_that_keeps_nothing_is_an_error_naming_source_file_and_reasons(
    tmp_path: Path,
) -> None:
    ann = tmp_path / "raw/llava.jsonl"
    ann.parent.mkdir()
    ann.write_text('{"id": 1}\n{not json\n{"conversations": []}\n', encoding="utf-8")
    opts = PrepareOptions(None, tmp_path / "out", files=[ann])
    with pytest.raises(DataError) as info:
        prepare_data(["llava_json"], opts)
    message = str(info.value)
    assert message == (
        f"llava_json: kept 0 samples from {ann}: dropped 3 (malformed_record 3); "
        f"details in {tmp_path / 'out/report.json'}"
    )
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert report["llava_json"]["dropped"] == {"malformed_record": 3}
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert "llava_json" not in manifest["sources"]  # a re-run tries again, never "up to date"
    with pytest.raises(DataError, match="kept 0 samples"):
        prepare_data(["llava_json"], opts)
    cli = subprocess.run(
        [sys.executable, "-m", "dsvl_cli", "prepare-data", "llava_json", "--file", str(ann),
         "--out", str(tmp_path / "out2")],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "400"},
    )  # fmt: skip
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    assert "llava_json: kept 0 samples from" in cli.stderr and "malformed_record 3" in cli.stderr


@pytest.mark.parametrize("seed", [3, 4])
def test_coco_caption_never_picks_the_blank_caption(tmp_path: Path, seed: int) -> None:
    save_image(tmp_path / "raw/coco/2014/a.jpg")
    sentences = [{"raw": r} for r in ["A red square.", "  ", "A plain red picture."]]
    dataset = {"images": [{"filename": "a.jpg", "cocoid": 1, "sentences": sentences}]}
    (tmp_path / "raw/coco_caption").mkdir(parents=True)
    (tmp_path / "raw/coco_caption/dataset.json").write_text(json.dumps(dataset))
    opts = PrepareOptions(tmp_path / "raw", tmp_path / "out", seed=seed)
    [result] = prepare_data(["coco_caption"], opts)
    assert result.kept == 1 and not result.drops
    [conv] = read_jsonl(tmp_path / "out/coco_caption.jsonl")
    assert conv.messages[1].content in ("A red square.", "A plain red picture.")


def test_a_file_uri_image_is_kept(tmp_path: Path) -> None:
    picture = save_image(tmp_path / "data/my images/a b.png")
    ann = tmp_path / "data/llava.json"
    ann.write_text(json.dumps(llava_records([picture.as_uri()])))
    [result] = prepare_data(["llava_json"], PrepareOptions(None, tmp_path / "out", files=[ann]))
    assert result.kept == 1 and not result.drops
    [conv] = read_jsonl(tmp_path / "out/llava_json.jsonl")
    assert conv.images == [str(picture)]


def test_image_check_results_do_not_depend_on_the_worker_count(tmp_path: Path) -> None:
    images = tmp_path / "raw/imgs"
    names = []
    for i in range(12):
        names.append(save_image(images / f"{i}.png", "blue").name)
    (images / "empty.jpg").write_bytes(b"")
    (images / "cut.png").write_bytes((images / "0.png").read_bytes()[:60])
    names += ["empty.jpg", "cut.png", "gone.png", "3.png"]
    ann = tmp_path / "raw/llava.json"
    ann.write_text(json.dumps(llava_records([f"imgs/{n}" for n in names])))
    outputs = []
    for workers in (1, 2, 3):
        out = tmp_path / f"out{workers}"
        [result] = prepare_data(["llava_json"], PrepareOptions(None, out, files=[ann],
                                                               workers=workers))  # fmt: skip
        report = json.loads((out / "report.json").read_text())
        outputs.append(((out / "llava_json.jsonl").read_bytes(), report, result.kept))
    assert outputs[0] == outputs[1] == outputs[2]
    assert outputs[0][2] == 13
    with pytest.raises(DataError, match="--workers must be at least 1"):
        prepare_data(["llava_json"], PrepareOptions(None, tmp_path / "o", files=[ann], workers=0))


def test_eval_sets_with_a_byte_order_mark_and_file_uris(tmp_path: Path) -> None:
    from dsvl_cli.inference.evaluate import read_eval_set

    picture = save_image(tmp_path / "my images/a b.png")
    path = tmp_path / "eval.json"
    tests = {"t1": [["What is <image>?", picture.as_uri()], ["And now?"]]}
    path.write_bytes(BOM + json.dumps(tests).encode())
    [test] = read_eval_set(path)
    assert test.rounds[0].paths == (picture,) and test.rounds[0].question == "What is <image>?"
