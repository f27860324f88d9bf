"""Single-image, single-round sources: aokvqa, coco_caption, minigpt4, ocr_vqa.

Each raw record becomes one conversation `"<image>\\n{question}" -> answer`. Grouping several of
them into one multi-image sample is blend.py's job. Random prompt/caption/QA choices, redrawn on
every access by the original, are drawn once here from `ctx.rng`, among usable candidates only
(`choose`). A raw question may hold its one `<image>`; any other count is "placeholder_mismatch".
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from dsvl_cli.data.conversation import Conversation
from dsvl_cli.data.json_files import read_json
from dsvl_cli.data.sources.base import (
    PLACEHOLDER_MISMATCH,
    RequiredFile,
    Source,
    SourceContext,
    choose,
    conversation,
    expect_type,
    placeholders_fit,
    strip_placeholders,
    usable_text,
    user_text,
)
from dsvl_cli.data.sources.files import resolve_image
from dsvl_cli.data.sources.prompts import CAPTION_PROMPTS, REASON_QUESTIONS

COCO_TRAIN2017 = RequiredFile(
    "coco/train2017",
    "dir",
    "download 2017 Train images [118K/18GB] from https://cocodataset.org/#download "
    "and save them at {data_path}/coco/train2017/",
)


class AokvqaSource(Source):
    """A-OKVQA train: question + a reason question -> "The answer is X. Because ..."."""

    name = "aokvqa"
    required = (
        COCO_TRAIN2017,
        RequiredFile(
            "aokvqa/annotations/aokvqa_v1p0_train.json",
            "file",
            "download aokvqa_v1p0_train.json from https://allenai.org/project/a-okvqa/home "
            "and save it at {data_path}/aokvqa/annotations/",
        ),
    )

    def records(self, ctx: SourceContext) -> Iterator[Conversation]:
        ann_path = ctx.data_path / self.required[1].path
        for index, ann in enumerate(expect_type(read_json(ann_path), list, ann_path, "a list")):
            conv_id = f"{self.name}:{_field(ann, 'question_id', index)}"
            try:
                raw_question = str(ann["question"])
                choice = ann["choices"][ann["correct_choice_idx"]]
                answer = f"The answer is {choice}. Because {' '.join(ann['rationales'])}"
                image = ctx.data_path / "coco/train2017" / f"{int(ann['image_id']):012d}.jpg"
            except (KeyError, IndexError, TypeError, ValueError):
                ctx.drop("malformed_record", conv_id)
                continue
            if not placeholders_fit([raw_question], 1):
                ctx.drop(PLACEHOLDER_MISMATCH, conv_id)
                continue
            reason = choose(ctx.rng, REASON_QUESTIONS) or ""
            question = f"{strip_placeholders(raw_question)} {reason}"
            yield conversation(conv_id, [(user_text(question, 1), answer)], [image])


class CocoCaptionSource(Source):
    """COCO captions (Karpathy split file, all splits): random prompt -> random reference."""

    name = "coco_caption"
    required = (
        RequiredFile(
            "coco/2014",
            "dir",
            "download 2014 Train images and 2014 Val images from https://cocodataset.org/#download "
            "and save all images (flat) at {data_path}/coco/2014/",
        ),
        RequiredFile(
            "coco_caption/dataset.json",
            "file",
            "download dataset.json from https://cs.stanford.edu/people/karpathy/deepimagesent/"
            "coco.zip and save it at {data_path}/coco_caption/",
        ),
    )

    def records(self, ctx: SourceContext) -> Iterator[Conversation]:
        ann_path = ctx.data_path / self.required[1].path
        data = expect_type(read_json(ann_path), dict, ann_path, 'an object with "images"')
        images = expect_type(data.get("images"), list, ann_path, 'an "images" list')
        for index, ann in enumerate(images):
            conv_id = f"{self.name}:{_field(ann, 'cocoid', index)}"
            sentences = ann.get("sentences") if isinstance(ann, dict) else None
            sentences = sentences if isinstance(sentences, list) else [sentences]
            filename = ann.get("filename") if isinstance(ann, dict) else None
            if not isinstance(filename, str) or sentences in ([], [None]):
                ctx.drop("malformed_record", conv_id)
                continue
            picked = choose(ctx.rng, sentences, _usable_sentence)
            image, reason = resolve_image(filename, ctx.data_path / "coco/2014", ctx, self.name)
            if picked is None or image is None:
                ctx.drop(reason or "empty_answer", conv_id)
                continue
            question = user_text(choose(ctx.rng, CAPTION_PROMPTS) or "", 1)
            yield conversation(conv_id, [(question, picked["raw"])], [image])


class MiniGpt4Source(Source):
    """MiniGPT-4 cc_sbu_align: random caption prompt -> the detailed caption."""

    name = "minigpt4"
    required = (
        RequiredFile(
            "cc_sbu_align/image",
            "dir",
            "download the image folder from https://huggingface.co/datasets/Vision-CAIR/"
            "cc_sbu_align and save it at {data_path}/cc_sbu_align/",
        ),
        RequiredFile(
            "cc_sbu_align/filter_cap.json",
            "file",
            "download filter_cap.json from https://huggingface.co/datasets/Vision-CAIR/"
            "cc_sbu_align and save it at {data_path}/cc_sbu_align/",
        ),
    )

    def records(self, ctx: SourceContext) -> Iterator[Conversation]:
        ann_path = ctx.data_path / self.required[1].path
        data = expect_type(read_json(ann_path), dict, ann_path, 'an object with "annotations"')
        annotations = expect_type(data.get("annotations"), list, ann_path, '"annotations" list')
        for index, ann in enumerate(annotations):
            conv_id = f"{self.name}:{_field(ann, 'image_id', index)}"
            try:
                caption = ann["caption"]
                image = ctx.data_path / "cc_sbu_align/image" / f"{ann['image_id']}.jpg"
            except (KeyError, TypeError):
                ctx.drop("malformed_record", conv_id)
                continue
            question = user_text(choose(ctx.rng, CAPTION_PROMPTS) or "", 1)
            yield conversation(conv_id, [(question, caption)], [image])


class OcrVqaSource(Source):
    """OCR-VQA (all splits): one randomly drawn (question, answer) pair per book cover.

    The pair is drawn among pairs whose question and answer both hold text ("empty_qa" if none).

    Reads each image's header (size only, no decode) because the original dropped covers of
    1 px or less in either dimension (placeholders for unavailable covers): "tiny_image";
    a missing cover is "missing_image" and an unreadable header "bad_image".
    """

    name = "ocr_vqa"
    required = (
        RequiredFile(
            "OCR_VQA/images",
            "dir",
            "download the images folder from https://ocr-vqa.github.io/ "
            "and save it at {data_path}/OCR_VQA/",
        ),
        RequiredFile(
            "OCR_VQA/dataset.json",
            "file",
            "download dataset.json from https://ocr-vqa.github.io/ "
            "and save it at {data_path}/OCR_VQA/",
        ),
    )

    def records(self, ctx: SourceContext) -> Iterator[Conversation]:
        ann_path = ctx.data_path / self.required[1].path
        data = expect_type(read_json(ann_path), dict, ann_path, "an object of key -> record")
        for key, ann in data.items():
            conv_id = f"{self.name}:{key}"
            try:
                ext = os.path.splitext(ann["imageURL"])[1]
                questions, answers = list(ann["questions"]), list(ann["answers"])
            except (KeyError, TypeError):
                ctx.drop("malformed_record", conv_id)
                continue
            if not questions or len(questions) != len(answers):
                ctx.drop("malformed_record", conv_id)
                continue
            pair = choose(ctx.rng, list(zip(questions, answers, strict=True)), _usable_pair)
            if pair is None or not placeholders_fit([pair[0]], 1):
                ctx.drop("empty_qa" if pair is None else PLACEHOLDER_MISMATCH, conv_id)
                continue
            question, answer = strip_placeholders(pair[0]), pair[1]
            image = ctx.data_path / "OCR_VQA/images" / f"{key}{ext}"
            reason = _size_problem(image)
            if reason is not None:
                ctx.drop(reason, str(image))
                continue
            yield conversation(conv_id, [(user_text(question, 1), answer)], [image])


def _usable_sentence(sentence: Any) -> bool:
    """A Karpathy-split sentence whose `raw` caption holds text."""
    return isinstance(sentence, dict) and usable_text(sentence.get("raw"))


def _usable_pair(pair: tuple[Any, Any]) -> bool:
    """An OCR-VQA (question, answer) pair where both hold text."""
    return usable_text(pair[0]) and usable_text(pair[1])


def _size_problem(path: Path) -> str | None:
    """Why an OCR-VQA cover is unusable (reads the header only), or None if it is fine."""
    if not path.is_file():
        return "missing_image"
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (OSError, UnidentifiedImageError):
        return "bad_image"
    return "tiny_image" if width <= 1 or height <= 1 else None


def _field(ann: object, key: str, default: object) -> object:
    """`ann[key]` if `ann` is a dict holding it, else `default` (ids for malformed records)."""
    return ann.get(key, default) if isinstance(ann, dict) else default
