"""Single-image, single-round sources: aokvqa, coco_caption, minigpt4, ocr_vqa.

Each raw record becomes one conversation `"<image>\\n{question}" -> answer`. Grouping several of
them into one multi-image sample is blend.py's job. Random prompt/caption/QA choices, redrawn on
every access by the original, are drawn once here from `ctx.rng`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from dsvl_cli.data.conversation import Conversation
from dsvl_cli.data.sources.base import (
    RequiredFile,
    Source,
    SourceContext,
    conversation,
    expect_type,
    read_json,
    user_text,
)
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
                question = f"{ann['question']} {ctx.rng.choice(REASON_QUESTIONS)}"
                choice = ann["choices"][ann["correct_choice_idx"]]
                answer = f"The answer is {choice}. Because {' '.join(ann['rationales'])}"
                image = ctx.data_path / "coco/train2017" / f"{int(ann['image_id']):012d}.jpg"
            except (KeyError, IndexError, TypeError, ValueError):
                ctx.drop("malformed_record", conv_id)
                continue
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
            try:
                sentences = ann["sentences"]
                sentences = sentences if isinstance(sentences, list) else [sentences]
                caption = ctx.rng.choice(sentences)["raw"]
                image = ctx.data_path / "coco/2014" / ann["filename"]
            except (KeyError, IndexError, TypeError):
                ctx.drop("malformed_record", conv_id)
                continue
            question = user_text(ctx.rng.choice(CAPTION_PROMPTS), 1)
            yield conversation(conv_id, [(question, caption)], [image])


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
            question = user_text(ctx.rng.choice(CAPTION_PROMPTS), 1)
            yield conversation(conv_id, [(question, caption)], [image])


class OcrVqaSource(Source):
    """OCR-VQA (all splits): one randomly drawn (question, answer) pair per book cover.

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
                questions, answers = ann["questions"], ann["answers"]
                index = ctx.rng.randrange(len(questions))
                question, answer = questions[index], answers[index]
            except (KeyError, IndexError, TypeError, ValueError):
                ctx.drop("malformed_record", conv_id)
                continue
            image = ctx.data_path / "OCR_VQA/images" / f"{key}{ext}"
            reason = _size_problem(image)
            if reason is not None:
                ctx.drop(reason, str(image))
                continue
            yield conversation(conv_id, [(user_text(question, 1), answer)], [image])


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
