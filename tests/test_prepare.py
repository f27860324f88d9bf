"""prepare-data: layout checks with hints, image checks, drop report, idempotence."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dsvl_cli.data.conversation import read_jsonl
from dsvl_cli.data.prepare import PrepareOptions, prepare_data
from dsvl_cli.errors import DataError


def write_llava_json(root: Path) -> Path:
    """A LLaVA-format file with one good, one empty, one truncated and one missing image."""
    images = root / "imgs"
    images.mkdir(parents=True)
    Image.new("RGB", (24, 24), "red").save(images / "good.png")
    (images / "empty.jpg").write_bytes(b"")
    buf = images / "full.jpg"
    Image.new("RGB", (64, 64), "blue").save(buf, quality=95)
    (images / "cut.jpg").write_bytes(buf.read_bytes()[:200])
    records = [
        {
            "id": f"r{i}",
            "image": name,
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": "a colour"},
            ],
        }
        for i, name in enumerate(["good.png", "empty.jpg", "cut.jpg", "gone.png", "good.png"])
    ]
    records.append({"id": "bad", "conversations": "not a list"})
    path = root / "llava.json"
    path.write_text(json.dumps(records))
    return path


def options(tmp_path: Path, ann: Path, **kw: object) -> PrepareOptions:
    return PrepareOptions(
        data_path=None, out=tmp_path / "out", files=[ann], image_root=ann.parent / "imgs", **kw
    )


def test_drops_are_counted_by_reason(tmp_path: Path) -> None:
    ann = write_llava_json(tmp_path / "raw")
    [result] = prepare_data(["llava_json"], options(tmp_path, ann))
    assert result.kept == 2
    report = json.loads((tmp_path / "out/report.json").read_text())["llava_json"]
    assert report["kept"] == 2
    dropped = report["dropped"]
    assert dropped["image_empty_file"] == 1 and dropped["image_missing"] == 1
    assert dropped["image_truncated"] + dropped.get("image_unreadable", 0) == 1
    assert sum(v for k, v in dropped.items() if not k.startswith("image_")) == 1  # the bad record
    convs = list(read_jsonl(tmp_path / "out/llava_json.jsonl"))
    assert [c.id.rsplit(":", 1)[-1] for c in convs] == ["r0", "r4"]
    assert all(Path(c.images[0]).is_absolute() for c in convs)


def test_rerun_is_a_no_op_and_changes_are_detected(tmp_path: Path) -> None:
    ann = write_llava_json(tmp_path / "raw")
    prepare_data(["llava_json"], options(tmp_path, ann))
    out = tmp_path / "out/llava_json.jsonl"
    before = (out.stat().st_mtime_ns, out.read_bytes())
    [again] = prepare_data(["llava_json"], options(tmp_path, ann))
    assert again.skipped_up_to_date and out.stat().st_mtime_ns == before[0]
    records = json.loads(ann.read_text())[:1]
    ann.write_text(json.dumps(records))
    [changed] = prepare_data(["llava_json"], options(tmp_path, ann))
    assert not changed.skipped_up_to_date and changed.kept == 1
    [reseeded] = prepare_data(["llava_json"], options(tmp_path, ann, seed=5))
    assert not reseeded.skipped_up_to_date


def test_no_image_check_keeps_everything_the_adapter_accepts(tmp_path: Path) -> None:
    ann = write_llava_json(tmp_path / "raw")
    [result] = prepare_data(["llava_json"], options(tmp_path, ann, check_images=False))
    assert result.kept == 5


def test_missing_layout_lists_every_file_with_hints(tmp_path: Path) -> None:
    opts = PrepareOptions(data_path=tmp_path, out=tmp_path / "out")
    with pytest.raises(DataError) as info:
        prepare_data(["llava", "ocr_vqa"], opts)
    message = str(info.value)
    assert "llava/detail_23k.json" in message and "huggingface.co" in message
    assert "OCR_VQA" in message and "ocr-vqa.github.io" in message


def test_cli_reports_and_exits_2_on_missing_data(tmp_path: Path) -> None:
    ann = write_llava_json(tmp_path / "raw")
    cmd = [sys.executable, "-m", "dsvl_cli", "prepare-data"]
    ok = subprocess.run(
        [
            *cmd,
            "llava_json",
            "--file",
            str(ann),
            "--image-root",
            str(ann.parent / "imgs"),
            "--out",
            str(tmp_path / "out"),
            "--show",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "llava_json" in ok.stdout and "image_missing" in ok.stdout
    assert "### Question:" in ok.stdout
    bad = subprocess.run(
        [*cmd, "llava", "--data-path", str(tmp_path), "--out", str(tmp_path / "o2")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "detail_23k.json" in bad.stderr
    typo = subprocess.run(
        [*cmd, "lava", "--out", str(tmp_path / "o3")], capture_output=True, text=True
    )
    assert typo.returncode == 2 and "did you mean 'llava'" in typo.stderr


def test_without_data_path_the_message_names_the_flag_and_the_source(tmp_path: Path) -> None:
    opts = PrepareOptions(data_path=None, out=tmp_path / "out")
    with pytest.raises(DataError) as info:
        prepare_data(["llava"], opts)
    assert str(info.value) == (
        "prepare-data: llava needs --data-path DIR, the folder that holds its raw files "
        "(coco/train2017/, llava/detail_23k.json, llava/complex_reasoning_77k.json)"
    )
    with pytest.raises(DataError) as info:
        prepare_data(["llava_json"], opts)
    assert str(info.value) == (
        "prepare-data: llava_json needs --file FILE, its input JSON or JSONL (repeat --file "
        "for several)"
    )
    missing = PrepareOptions(data_path=None, out=tmp_path / "out", files=[tmp_path / "no.json"])
    with pytest.raises(DataError) as info:
        prepare_data(["llava_json"], missing)
    assert "None" not in str(info.value) and "no.json not found" in str(info.value)
