"""Source adapters, part 1: registry, check(), and the single-image DSVL sources + llava/llava_dial.

Every fixture is written into tmp_path in the dataset's published layout; images are tiny PNG/JPEG
files made with PIL. Groups (otter, blend, sparkles) are in test_sources_groups.py, user-file
formats (llava_json, messages) in test_sources_files.py.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from dsvl_cli.data.sources import DSVL_NAMES, SOURCES, SourceContext, get_source
from dsvl_cli.data.sources.prompts import CAPTION_PROMPTS, REASON_QUESTIONS
from dsvl_cli.errors import ConfigError, DataError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_ctx(data: Path, seed: int = 0, **kwargs: Any) -> SourceContext:
    return SourceContext(
        data_path=data, image_out=data.parent / "out" / "images", rng=random.Random(seed), **kwargs
    )


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def make_image(path: Path, size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


def load(name: str, data: Path, seed: int = 0, **kwargs: Any) -> tuple[list, SourceContext]:
    ctx = make_ctx(data, seed, **kwargs)
    source = get_source(name)
    assert source.check(ctx) == []
    return list(source.load(ctx)), ctx


def texts(conv) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in conv.messages]


# --- registry and check() ----------------------------------------------------------------------


def test_registry_has_exactly_the_dsvl_names_plus_file_formats() -> None:
    assert len(DSVL_NAMES) == 13
    assert set(SOURCES) == set(DSVL_NAMES) | {"llava_json", "messages"}
    assert all(SOURCES[name].name == name for name in SOURCES)


def test_unknown_source_suggests_closest_name() -> None:
    with pytest.raises(ConfigError, match="did you mean 'llava_dial'"):
        get_source("llava_dail")
    with pytest.raises(ConfigError, match="generated"):
        get_source("synthetic")


@pytest.mark.parametrize("name", DSVL_NAMES)
def test_check_lists_every_missing_input_with_its_download_hint(name: str, tmp_path: Path) -> None:
    source = get_source(name)
    problems = source.check(make_ctx(tmp_path))
    assert len(problems) == len(source.required) > 0
    for problem, req in zip(problems, source.required, strict=True):
        assert str(tmp_path / req.path) in problem
        assert "https://" in problem and "{data_path}" not in problem
    with pytest.raises(DataError, match="missing inputs"):
        next(iter(source.load(make_ctx(tmp_path))))


def test_check_reports_only_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "coco/train2017").mkdir(parents=True)
    problems = get_source("llava").check(make_ctx(tmp_path))
    assert len(problems) == 2
    assert "detail_23k.json" in problems[0] and "LLaVA-Instruct-150K" in problems[0]


# --- single-image sources ----------------------------------------------------------------------


def test_aokvqa(tmp_path: Path) -> None:
    (tmp_path / "coco/train2017").mkdir(parents=True)
    record = {
        "question_id": "q1",
        "image_id": 42,
        "question": "What animal is this?",
        "choices": ["dog", "cat"],
        "correct_choice_idx": 1,
        "rationales": ["It purrs.", "It has whiskers."],
    }
    broken = {"question_id": "q2", "image_id": 7, "question": "Where?"}
    write_json(tmp_path / "aokvqa/annotations/aokvqa_v1p0_train.json", [record, broken])
    convs, ctx = load("aokvqa", tmp_path)
    assert len(convs) == 1
    conv = convs[0]
    assert conv.id == "aokvqa:q1" and conv.source == "aokvqa"
    assert conv.images == [str(tmp_path / "coco/train2017/000000000042.jpg")]
    prefix = "<image>\nWhat animal is this? "
    assert conv.messages[0].content.startswith(prefix)
    assert conv.messages[0].content[len(prefix) :] in REASON_QUESTIONS
    assert conv.messages[1].content == "The answer is cat. Because It purrs. It has whiskers."
    assert ctx.drops == {"malformed_record": 1}
    assert ctx.drop_examples["malformed_record"] == ["aokvqa:q2"]


def _coco_caption_fixture(data: Path) -> list[str]:
    (data / "coco/2014").mkdir(parents=True)
    raws = ["A red square.", "Something red.", "A small picture."]
    images = [
        {"filename": "COCO_val2014_000000000001.jpg", "cocoid": 1, "split": "val",
         "sentences": [{"raw": r} for r in raws]},
        {"filename": "COCO_train2014_000000000002.jpg", "cocoid": 2, "split": "train",
         "sentences": [{"raw": "Only one."}]},
        {"cocoid": 3, "sentences": []},
    ]  # fmt: skip
    write_json(data / "coco_caption/dataset.json", {"images": images})
    return raws


def test_coco_caption_draws_prompt_and_caption_once_deterministically(tmp_path: Path) -> None:
    raws = _coco_caption_fixture(tmp_path)
    convs, ctx = load("coco_caption", tmp_path, seed=3)
    assert [c.id for c in convs] == ["coco_caption:1", "coco_caption:2"]  # all splits kept
    assert convs[0].images == [str(tmp_path / "coco/2014/COCO_val2014_000000000001.jpg")]
    for conv in convs:
        user = conv.messages[0].content
        assert user.startswith("<image>\n") and user[len("<image>\n") :] in CAPTION_PROMPTS
    assert convs[0].messages[1].content in raws
    assert convs[1].messages[1].content == "Only one."
    assert ctx.drops == {"malformed_record": 1}
    again, _ = load("coco_caption", tmp_path, seed=3)
    assert [c.to_dict() for c in again] == [c.to_dict() for c in convs]
    seen = {load("coco_caption", tmp_path, seed=s)[0][0].messages[0].content for s in range(12)}
    assert len(seen) > 1  # the prompt really is drawn


def test_minigpt4(tmp_path: Path) -> None:
    (tmp_path / "cc_sbu_align/image").mkdir(parents=True)
    anns = [{"image_id": "2", "caption": "A detailed caption."}, {"caption": "no id"}]
    write_json(tmp_path / "cc_sbu_align/filter_cap.json", {"annotations": anns})
    convs, ctx = load("minigpt4", tmp_path)
    assert len(convs) == 1 and convs[0].id == "minigpt4:2"
    assert convs[0].images == [str(tmp_path / "cc_sbu_align/image/2.jpg")]
    assert convs[0].messages[1].content == "A detailed caption."
    assert convs[0].messages[0].content.removeprefix("<image>\n") in CAPTION_PROMPTS
    assert ctx.drops == {"malformed_record": 1}


def test_ocr_vqa_filters_tiny_and_missing_covers(tmp_path: Path) -> None:
    images = tmp_path / "OCR_VQA/images"
    make_image(images / "111.jpg", (8, 10))
    make_image(images / "222.gif", (1, 1))
    questions = ["Who wrote this book?", "What is the title?", "Is this a novel?"]
    answers = ["Jane Doe", "Red Squares", "Yes"]
    raw = {
        "111": {"imageURL": "http://x/111.jpg", "questions": questions, "answers": answers},
        "222": {"imageURL": "http://x/222.gif", "questions": ["Q?"], "answers": ["A"]},
        "333": {"imageURL": "http://x/333.jpg", "questions": ["Q?"], "answers": ["A"]},
        "444": {"imageURL": "http://x/444.jpg", "questions": [], "answers": []},
    }
    write_json(tmp_path / "OCR_VQA/dataset.json", raw)
    convs, ctx = load("ocr_vqa", tmp_path)
    assert [c.id for c in convs] == ["ocr_vqa:111"]
    assert convs[0].images == [str(images / "111.jpg")]
    pair = (convs[0].messages[0].content.removeprefix("<image>\n"), convs[0].messages[1].content)
    assert pair in set(zip(questions, answers, strict=True))
    assert ctx.drops == {"tiny_image": 1, "missing_image": 1, "malformed_record": 1}


# --- llava / llava_dial ------------------------------------------------------------------------


def _turns(*values: str) -> list[dict[str, str]]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def test_llava_uses_first_pair_and_strips_newlines_like_the_original(tmp_path: Path) -> None:
    (tmp_path / "coco/train2017").mkdir(parents=True)
    detail = [
        {"id": "9", "image": "000000000009.jpg",
         "conversations": _turns("<image>\nDescribe the\nimage.", "A red square.")},
        {"id": "9", "image": "000000000009.jpg",
         "conversations": _turns("What colour?\n<image>", "Red.", "Extra?", "Ignored.")},
        {"id": "bad", "image": "x.jpg", "conversations": [{"from": "gpt", "value": "?"}]},
    ]  # fmt: skip
    complex_ = [{"id": "9", "image": "000000000009.jpg", "conversations": _turns("Why?", "So.")}]
    write_json(tmp_path / "llava/detail_23k.json", detail)
    write_json(tmp_path / "llava/complex_reasoning_77k.json", complex_)
    convs, ctx = load("llava", tmp_path)
    assert [c.id for c in convs] == [
        "llava:detail_23k:9",
        "llava:detail_23k:9#2",
        "llava:complex_reasoning_77k:9",
    ]
    image = str(tmp_path / "coco/train2017/000000000009.jpg")
    assert all(c.images == [image] for c in convs)
    assert texts(convs[0]) == [
        ("user", "<image>\nDescribe theimage."),  # every newline removed, as the original
        ("assistant", "A red square."),
    ]
    assert texts(convs[1]) == [("user", "<image>\nWhat colour?"), ("assistant", "Red.")]
    assert ctx.drops == {"malformed_record": 1}


def test_llava_dial_all_rounds_image_on_first(tmp_path: Path) -> None:
    (tmp_path / "coco/train2017").mkdir(parents=True)
    dialogues = [
        {"id": "1", "image": "a.jpg",
         "conversations": _turns("What is\nthis?\n<image>", "A square.", "Colour?", "Red.")},
        {"id": "2", "image": "b.jpg", "conversations": _turns("Hi", "Hello", "Odd?")},
    ]  # fmt: skip
    write_json(tmp_path / "llava/conversation_58k.json", dialogues)
    convs, ctx = load("llava_dial", tmp_path)
    assert len(convs) == 1
    assert texts(convs[0]) == [
        ("user", "<image>\nWhat isthis?"),
        ("assistant", "A square."),
        ("user", "Colour?"),
        ("assistant", "Red."),
    ]
    assert convs[0].images == [str(tmp_path / "coco/train2017/a.jpg")]
    assert ctx.drops == {"odd_turns": 1}
