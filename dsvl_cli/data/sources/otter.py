"""MIMIC-IT (Otter) sources: otter_mimicit_{cgd,sd,sn,tvc,vst}.

Raw layout: `MIMIC-IT/<SUBSET>_instructions.json` = `{"data": {ins_id: {"instruction", "answer",
"image_ids": [...], "rel_ins_ids": [...]}}}`. Instructions that share an image set are merged
through `rel_ins_ids` into one multi-QA group (the original's `*_merged*.json` caches), and each
group becomes ONE conversation that uses every QA of the group: all images in round 1, the other
QAs after it, text-only, in an order drawn once from `ctx.rng`.

Images: CGD uses the COCO train2017 files (`CGD_IMG_<name>` -> `coco/train2017/<name>.jpg`,
existence left to prepare.py). SD/SN/TVC/VST ship images as `MIMIC-IT/<SUBSET>.json`, a multi-GB
dict image_id -> base64 JPEG. It is streamed with ijson (`stream_object`), never loaded whole
(that took about twice the file's size in memory): one pass collects the image ids, groups are
merged, and a second pass decodes the images of kept groups as they pass, writing them to
`ctx.image_out/<source>/<image_id>.jpg` (skipped when a file of the same size is already there).
Memory holds one image at a time; parsing is fast next to decoding, so the id pass costs little.
Image ids absent from that dict are left out of their group, as the original did (counted as
"missing_image_data"; see Otter issue #172); a group left with no image is dropped ("no_images"),
one with more than `ctx.max_images` too ("too_many_images": the original did this for SN/TVC/VST
only, while SD/CGD groups over 8 images crashed its template).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsvl_cli.data.conversation import Conversation
from dsvl_cli.data.json_files import read_json, stream_object
from dsvl_cli.data.sources.base import (
    PLACEHOLDER_MISMATCH,
    RequiredFile,
    Source,
    SourceContext,
    clean_dsvl_question,
    conversation,
    expect_type,
    placeholders_fit,
    user_text,
)
from dsvl_cli.data.sources.files import decode_base64, write_once
from dsvl_cli.data.sources.vqa import COCO_TRAIN2017

MIMICIT_URL = "https://huggingface.co/datasets/pufanyi/MIMICIT"
IMAGES_WHAT = "image_id -> base64 JPEG"
CGD_PREFIX = "CGD_IMG_"

# Decides a head record's images: (image references, "") to keep it, (None, reason) to drop it.
ImageSelector = Callable[[list[str]], tuple[list[str] | None, str]]


@dataclass
class QaGroup:
    """Instructions merged through rel_ins_ids: same images, several (question, answer) pairs."""

    ins_ids: list[str]
    images: list[str]
    qas: list[tuple[str, str]]


def mimicit_file(name: str, what: str) -> RequiredFile:
    """RequiredFile for a file of the pufanyi/MIMICIT dataset under {data_path}/MIMIC-IT/."""
    return RequiredFile(
        f"MIMIC-IT/{name}",
        "file",
        f"download {what} from {MIMICIT_URL} and save it at {{data_path}}/MIMIC-IT/",
    )


def read_instructions(ctx: SourceContext, subset: str) -> dict[str, Any]:
    """The `data` dict of `MIMIC-IT/<subset>_instructions.json`."""
    path = ctx.data_path / "MIMIC-IT" / f"{subset}_instructions.json"
    raw = expect_type(read_json(path), dict, path, 'an object with a "data" field')
    return expect_type(raw.get("data"), dict, path, '"data": an object of ins_id -> instruction')


def _qa(record: Any) -> tuple[str, str] | None:
    """(instruction, answer) of a raw record, or None if either is missing or not text."""
    if not isinstance(record, dict):
        return None
    question, answer = record.get("instruction"), record.get("answer")
    if not (isinstance(question, str) and isinstance(answer, str)):
        return None
    return question, answer


def merge_related(
    data: dict[str, Any],
    order: list[str],
    select: ImageSelector,
    ctx: SourceContext,
    name: str,
) -> Iterator[QaGroup]:
    """Merge instructions into groups through `rel_ins_ids`, visiting heads in `order`.

    As the original: a head whose images fail `select` is dropped alone (its related records stay
    in the pool and are visited as heads later); a related record joins the first kept head that
    names it. Each instruction is about the whole image set: one whose `<image>` count is
    neither 0 nor the group's image count is dropped ("placeholder_mismatch"). Drops are counted
    per raw record.
    """
    pool = dict(data)
    for key in order:
        record = pool.pop(key, None)
        if record is None:
            continue
        qa = _qa(record)
        image_ids, related = record.get("image_ids"), record.get("rel_ins_ids", [])
        if qa is None or not isinstance(image_ids, list) or not isinstance(related, list):
            ctx.drop("malformed_record", f"{name}:{key}")
            continue
        images, reason = select([str(i) for i in image_ids])
        if images is not None and not placeholders_fit([qa[0]], len(images)):
            images, reason = None, PLACEHOLDER_MISMATCH
        if images is None:
            ctx.drop(reason, f"{name}:{key}")
            continue
        group = QaGroup(ins_ids=[key], images=images, qas=[qa])
        for rel in related:
            rel_record = pool.pop(rel, None) if rel != key else None
            if rel_record is None:
                continue
            rel_qa = _qa(rel_record)
            if rel_qa is None or not placeholders_fit([rel_qa[0]], len(images)):
                reason = "malformed_record" if rel_qa is None else PLACEHOLDER_MISMATCH
                ctx.drop(reason, f"{name}:{rel}")
                continue
            group.ins_ids.append(rel)
            group.qas.append(rel_qa)
        yield group


def group_conversation(
    ctx: SourceContext, conv_id: str, group: QaGroup, images: list[str]
) -> Conversation:
    """All images in round 1, then the remaining QAs; round order drawn once from ctx.rng."""
    order = list(range(len(group.qas)))
    ctx.rng.shuffle(order)
    rounds = []
    for position, index in enumerate(order):
        question, answer = group.qas[index]
        count = len(images) if position == 0 else 0
        rounds.append((user_text(clean_dsvl_question(question), count), answer))
    return conversation(conv_id, rounds, images, meta={"ins_ids": group.ins_ids})


class CgdSource(Source):
    """otter_mimicit_cgd: MIMIC-IT CGD instructions over COCO train2017 images."""

    name = "otter_mimicit_cgd"
    required = (COCO_TRAIN2017, mimicit_file("CGD_instructions.json", "CGD_instructions.json"))

    def records(self, ctx: SourceContext) -> Iterator[Conversation]:
        data = read_instructions(ctx, "CGD")
        order = list(data)
        ctx.rng.shuffle(order)
        root = ctx.data_path / "coco/train2017"

        def select(image_ids: list[str]) -> tuple[list[str] | None, str]:
            names = cgd_image_names(image_ids)
            if names is None:
                return None, "malformed_record"
            return [str(root / n) for n in names], ""

        for group in merge_related(data, order, select, ctx, self.name):
            yield group_conversation(ctx, f"{self.name}:{group.ins_ids[0]}", group, group.images)


def cgd_image_names(image_ids: list[str]) -> list[str] | None:
    """COCO file names of CGD image ids (`CGD_IMG_000000123.jpg` style), None if one is foreign."""
    if not image_ids or not all(i.startswith(CGD_PREFIX) for i in image_ids):
        return None
    return [f"{i[len(CGD_PREFIX) :]}.jpg" for i in image_ids]


class Base64ImageSource(Source):
    """otter_mimicit_{sd,sn,tvc,vst}: instructions + base64 image JSON, decoded at prepare time."""

    def __init__(self, name: str, subset: str) -> None:
        self.name = name
        self.subset = subset
        self.required = (
            mimicit_file(f"{subset}.json", f"{subset}.json"),
            mimicit_file(f"{subset}_instructions.json", f"{subset}_instructions.json"),
        )

    def records(self, ctx: SourceContext) -> Iterator[Conversation]:
        data = read_instructions(ctx, self.subset)
        image_path = ctx.data_path / "MIMIC-IT" / f"{self.subset}.json"
        present = {image_id for image_id, _ in stream_object(image_path, IMAGES_WHAT)}
        order = list(data)
        ctx.rng.shuffle(order)

        def select(image_ids: list[str]) -> tuple[list[str] | None, str]:
            kept = [i for i in image_ids if i in present]
            for missing in (i for i in image_ids if i not in present):
                ctx.drop("missing_image_data", f"{self.name}:{missing}")
            if not kept:
                return None, "no_images"
            if len(kept) > ctx.max_images:
                return None, "too_many_images"
            return kept, ""

        groups = list(merge_related(data, order, select, ctx, self.name))
        decoded = self._decode(ctx, image_path, {i for g in groups for i in g.images})
        for group in groups:
            conv_id = f"{self.name}:{group.ins_ids[0]}"
            paths = [decoded[i] for i in group.images]
            if any(p is None for p in paths):
                ctx.drop("bad_image_data", conv_id)
                continue
            yield group_conversation(ctx, conv_id, group, [p for p in paths if p is not None])

    def _decode(
        self, ctx: SourceContext, image_path: Path, wanted: set[str]
    ) -> dict[str, str | None]:
        """Stream the image file again; write each wanted image as it passes.

        Returns image id -> path for the prepared file, or None where the base64 is undecodable.
        Memory: one image at a time.
        """
        done: dict[str, str | None] = {}
        for image_id, blob in stream_object(image_path, IMAGES_WHAT):
            if image_id not in wanted:
                continue
            data = decode_base64(blob)
            out = ctx.image_out / self.name / f"{safe_file_name(image_id)}.jpg"
            if data:
                write_once(out, data)
            done[image_id] = ctx.written_image(out) if data else None
        return done


def safe_file_name(text: str) -> str:
    """`text` with anything but letters, digits, `.`, `_`, `-` replaced by `_`."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


MIMICIT_SOURCES: tuple[Source, ...] = (
    CgdSource(),
    Base64ImageSource("otter_mimicit_sd", "SD"),
    Base64ImageSource("otter_mimicit_sn", "SN"),
    Base64ImageSource("otter_mimicit_tvc", "TVC"),
    Base64ImageSource("otter_mimicit_vst", "VST"),
)
