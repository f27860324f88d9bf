"""Defect kinds run through every source that can carry them (one fixture builder per source):
placeholder counts that do not match the images, random picks that could land on a blank
candidate, files saved with a UTF-8 byte-order mark, and image references given as file URIs or
URLs."""

from __future__ import annotations

import base64
import io
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from dsvl_cli.data.sources import SOURCES, SourceContext, get_source

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GOOD = "<image>\nDescribe this photo."
BAD = "<image>\nCompare this photo with <image>."  # two placeholders, one image
ANSWER = "A red photo."
BAD_CAPTION = "Compare this photo with <image>."  # caption sources: the defect is in the answer


def write_json(path: Path, obj: Any, bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + json.dumps(obj).encode("utf-8"))
    return path


def jpeg(path: Path | None = None) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="JPEG")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


def turns(question: str, answer: str = ANSWER) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def ins(question: str, images: list[str]) -> dict[str, Any]:
    return {"instruction": question, "answer": ANSWER, "image_ids": images, "rel_ins_ids": []}


# Each builder writes one record in its source's layout and returns (data_path, context kwargs).
# `bad` puts the placeholder defect in; `image` overrides the image reference where one is read.
Builder = Callable[[Path, bool, bool, "str | None"], tuple[Path, dict[str, Any]]]


def _llava(root: Path, bad: bool, bom: bool, image: str | None) -> tuple[Path, dict[str, Any]]:
    (root / "coco/train2017").mkdir(parents=True)
    record = {"id": "r1", "image": image or "a.jpg", "conversations": turns(BAD if bad else GOOD)}
    write_json(root / "llava/detail_23k.json", [record], bom)
    write_json(root / "llava/complex_reasoning_77k.json", [], bom)
    return root, {}


def _llava_dial(root: Path, bad: bool, bom: bool, image: str | None) -> tuple[Path, dict]:
    (root / "coco/train2017").mkdir(parents=True)
    record = {"id": "r1", "image": image or "a.jpg", "conversations": turns(BAD if bad else GOOD)}
    write_json(root / "llava/conversation_58k.json", [record], bom)
    return root, {}


def _llava_json(root: Path, bad: bool, bom: bool, image: str | None) -> tuple[Path, dict]:
    record = {"id": "r1", "image": image or "a.jpg", "conversations": turns(BAD if bad else GOOD)}
    return write_json(root / "train.json", [record], bom), {}


def _messages(root: Path, bad: bool, bom: bool, image: str | None) -> tuple[Path, dict]:
    record = {"id": "r1", "images": [image or "a.jpg"], "messages": [
        {"role": "user", "content": BAD if bad else GOOD},
        {"role": "assistant", "content": ANSWER}]}  # fmt: skip
    path = root / "chat.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + json.dumps(record).encode() + b"\n")
    return path, {}


def _aokvqa(root: Path, bad: bool, bom: bool, image: str | None) -> tuple[Path, dict]:
    (root / "coco/train2017").mkdir(parents=True)
    record = {"question_id": "q1", "question": BAD if bad else "What is it?", "choices": ["cat"],
              "correct_choice_idx": 0, "rationales": ["It purrs."], "image_id": 1}  # fmt: skip
    write_json(root / "aokvqa/annotations/aokvqa_v1p0_train.json", [record], bom)
    return root, {}


def _coco_caption(root: Path, bad: bool, bom: bool, image: str | None) -> tuple[Path, dict]:
    (root / "coco/2014").mkdir(parents=True)
    record = {"filename": image or "a.jpg", "cocoid": 1,
              "sentences": [{"raw": BAD_CAPTION if bad else ANSWER}]}  # fmt: skip
    write_json(root / "coco_caption/dataset.json", {"images": [record]}, bom)
    return root, {}


def _minigpt4(root: Path, bad: bool, bom: bool, image: str | None) -> tuple[Path, dict]:
    (root / "cc_sbu_align/image").mkdir(parents=True)
    record = {"image_id": "1", "caption": BAD_CAPTION if bad else ANSWER}
    write_json(root / "cc_sbu_align/filter_cap.json", {"annotations": [record]}, bom)
    return root, {}


def _ocr_vqa(root: Path, bad: bool, bom: bool, image: str | None) -> tuple[Path, dict]:
    jpeg(root / "OCR_VQA/images/1.jpg")
    record = {"imageURL": "x/1.jpg", "questions": [BAD if bad else "Title?"], "answers": ["Red"]}
    write_json(root / "OCR_VQA/dataset.json", {"1": record}, bom)
    return root, {}


def _cgd(root: Path, bad: bool, bom: bool, image: str | None) -> tuple[Path, dict]:
    (root / "coco/train2017").mkdir(parents=True)
    data = {"CGD_INS_1": ins(BAD if bad else GOOD, ["CGD_IMG_000000000001"])}
    write_json(root / "MIMIC-IT/CGD_instructions.json", {"data": data}, bom)
    return root, {}


def _base64(subset: str) -> Builder:
    def build(root: Path, bad: bool, bom: bool, image: str | None) -> tuple[Path, dict]:
        blob = base64.b64encode(jpeg()).decode()
        write_json(root / f"MIMIC-IT/{subset}.json", {f"{subset}_IMG_1": blob}, bom)
        data = {"INS_1": ins(BAD if bad else GOOD, [f"{subset}_IMG_1"])}
        write_json(root / f"MIMIC-IT/{subset}_instructions.json", {"data": data}, bom)
        return root, {}

    return build


def _blend(root: Path, bad: bool, bom: bool, image: str | None) -> tuple[Path, dict]:
    (root / "coco/train2017").mkdir(parents=True)
    for name in ("detail_23k.json", "complex_reasoning_77k.json", "conversation_58k.json"):
        write_json(root / "llava" / name, [], bom)
    data = {"CGD_INS_1": ins(BAD if bad else GOOD, ["CGD_IMG_a"])}  # one image: no LLaVA needed
    write_json(root / "MIMIC-IT/CGD_instructions.json", {"data": data}, bom)
    return root, {}


def _sparkles(root: Path, bad: bool, bom: bool, image: str | None) -> tuple[Path, dict]:
    jpeg(root / "SparklesDialogueCC/images/1.jpg")
    (root / "SparklesDialogueVG/images").mkdir(parents=True)
    dialogue = {"dialogue_id": "d1", "dialogue": [
        {"role": "user", "content": BAD if bad else GOOD, "images": [{"image_id": 1}]},
        {"role": "assistant", "content": ANSWER}]}  # fmt: skip
    write_json(root / "SparklesDialogueCC/annotations/SparklesDialogueCC.json", [dialogue], bom)
    write_json(root / "SparklesDialogueVG/annotations/SparklesDialogueVG.json", [], bom)
    return root, {}


BUILDERS: dict[str, Builder] = {
    "llava": _llava,
    "llava_dial": _llava_dial,
    "llava_json": _llava_json,
    "messages": _messages,
    "aokvqa": _aokvqa,
    "coco_caption": _coco_caption,
    "minigpt4": _minigpt4,
    "ocr_vqa": _ocr_vqa,
    "otter_mimicit_cgd": _cgd,
    "otter_mimicit_sd": _base64("SD"),
    "otter_mimicit_sn": _base64("SN"),
    "otter_mimicit_tvc": _base64("TVC"),
    "otter_mimicit_vst": _base64("VST"),
    "llava_otter_blend": _blend,
    "sparkles_dialogue": _sparkles,
}
IMAGE_REF_SOURCES = ("llava", "llava_dial", "llava_json", "messages", "coco_caption")


def load(name: str, root: Path, bad: bool = False, bom: bool = False, image: str | None = None,
         seed: int = 0) -> tuple[list, SourceContext]:  # fmt: skip
    data, kwargs = BUILDERS[name](root / "raw", bad, bom, image)
    ctx = SourceContext(data, root / "out" / "images", random.Random(seed), **kwargs)
    return list(get_source(name).load(ctx)), ctx


def test_every_source_has_a_builder() -> None:
    assert set(BUILDERS) == set(SOURCES)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_the_fixture_record_is_kept(name: str, tmp_path: Path) -> None:
    convs, ctx = load(name, tmp_path)
    assert len(convs) == 1 and not ctx.drops
    assert convs[0].messages[0].content.count("<image>") == len(convs[0].images) == 1


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_placeholder_mismatch_is_dropped_and_counted_never_rewritten(
    name: str, tmp_path: Path
) -> None:
    convs, ctx = load(name, tmp_path, bad=True)
    assert convs == []
    assert ctx.drops == {"placeholder_mismatch": 1}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_files_with_a_byte_order_mark_are_read(name: str, tmp_path: Path) -> None:
    convs, ctx = load(name, tmp_path, bom=True)
    assert len(convs) == 1 and not ctx.drops


@pytest.mark.parametrize("name", IMAGE_REF_SOURCES)
def test_file_uri_image_references_are_percent_decoded(name: str, tmp_path: Path) -> None:
    picture = tmp_path / "my images" / "a b.jpg"
    jpeg(picture)
    uri = picture.as_uri()
    assert "%20" in uri
    convs, ctx = load(name, tmp_path, image=uri)
    assert [c.images for c in convs] == [[str(picture)]] and not ctx.drops


@pytest.mark.parametrize("name", IMAGE_REF_SOURCES)
@pytest.mark.parametrize(
    "ref", ["https://example.com/a.jpg", "http://x/a.jpg", "s3://b/a.jpg", "file://host/a.jpg"]
)
def test_remote_image_references_are_refused(name: str, ref: str, tmp_path: Path) -> None:
    convs, ctx = load(name, tmp_path, image=ref)
    assert convs == [] and ctx.drops == {"remote_image": 1}


# --- random picks among candidates ---------------------------------------------------------------


def _coco_blank(root: Path) -> None:
    (root / "coco/2014").mkdir(parents=True)
    sentences = [{"raw": "A red square."}, {"raw": "  "}, {"raw": "A plain red picture."}]
    record = {"filename": "a.jpg", "cocoid": 1, "sentences": sentences}
    write_json(root / "coco_caption/dataset.json", {"images": [record]})


def _ocr_blank(root: Path) -> None:
    jpeg(root / "OCR_VQA/images/1.jpg")
    record = {"imageURL": "x/1.jpg", "questions": ["Title?", "Author?", " "],
              "answers": ["Red", "  ", "Jane"]}  # fmt: skip
    write_json(root / "OCR_VQA/dataset.json", {"1": record})


def _blend_blank(root: Path) -> None:
    (root / "coco/train2017").mkdir(parents=True)
    good = {"image": "a.jpg", "conversations": turns("<image>\nWhat is a?", "A.")}
    blank = {"image": "a.jpg", "conversations": turns("Why a?", " ")}
    write_json(root / "llava/detail_23k.json", [good, blank, blank])
    write_json(root / "llava/complex_reasoning_77k.json", [])
    write_json(root / "llava/conversation_58k.json", [])
    data = {"CGD_INS_1": ins("Compare them.", ["CGD_IMG_a", "CGD_IMG_b"])}
    write_json(root / "MIMIC-IT/CGD_instructions.json", {"data": data})


RANDOM_PICKS = {
    "coco_caption": (_coco_blank, {}),
    "ocr_vqa": (_ocr_blank, {}),
    "llava_otter_blend": (_blend_blank, {"blank_llava_record": 2}),  # unusable candidates
}


@pytest.mark.parametrize("name", sorted(RANDOM_PICKS))
def test_random_picks_never_land_on_a_blank_candidate(name: str, tmp_path: Path) -> None:
    build, drops = RANDOM_PICKS[name]
    build(tmp_path / "raw")
    for seed in range(12):
        ctx = SourceContext(tmp_path / "raw", tmp_path / "out", random.Random(seed))
        convs = list(get_source(name).load(ctx))
        assert len(convs) == 1, f"seed {seed}: {dict(ctx.drops)}"
        assert all(m.content.strip() for m in convs[0].messages)
        assert ctx.drops == drops
