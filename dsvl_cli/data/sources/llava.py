"""LLaVA-format sources: the DSVL names `llava` and `llava_dial`, and generic `llava_json`.

LLaVA records look like `{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}`.
For the DSVL names, questions lose `<image>` and every newline, as the original did (parity);
`llava_json` keeps the text as is and only moves `<image>` placeholders to the start of their turn.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsvl_cli.data.conversation import IMAGE_PLACEHOLDER, Conversation
from dsvl_cli.data.json_files import read_json
from dsvl_cli.data.sources.base import (
    PLACEHOLDER_MISMATCH,
    RequiredFile,
    Source,
    SourceContext,
    clean_dsvl_question,
    conversation,
    expect_type,
    placeholders_fit,
    strip_placeholders,
    user_text,
)
from dsvl_cli.data.sources.files import (
    check_files,
    image_root,
    input_files,
    iter_records,
    resolve_image,
)
from dsvl_cli.data.sources.vqa import COCO_TRAIN2017

LLAVA_HINT = (
    "download {file} from https://huggingface.co/datasets/liuhaotian/LLaVA-Instruct-150K "
    "and save it at {{data_path}}/llava/"
)
USER_ROLES = frozenset({"human", "user"})
ASSISTANT_ROLES = frozenset({"gpt", "assistant"})


def llava_file(name: str) -> RequiredFile:
    """The RequiredFile entry for one LLaVA-Instruct-150K annotation file."""
    return RequiredFile(f"llava/{name}", "file", LLAVA_HINT.format(file=name))


@dataclass(frozen=True)
class Dialogue:
    """A parsed LLaVA record: optional system text, (user, assistant) pairs, odd-turn flag."""

    system: str | None
    pairs: list[tuple[str, str]]
    odd: bool


def parse_dialogue(record: Any) -> Dialogue | None:
    """Parse `record["conversations"]`, or return None if it is not a valid LLaVA dialogue.

    A leading `system` turn becomes `system`; roles must alternate human/gpt and values must be
    strings. A trailing unanswered human turn sets `odd` (callers decide what to do with it).
    """
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        return None
    system = None
    if turns and turns[0].get("from") == "system":
        system, turns = turns[0].get("value"), turns[1:]
        if not isinstance(system, str):
            return None
    pairs = []
    for i in range(0, len(turns) - 1, 2):
        user, bot = turns[i], turns[i + 1]
        if user.get("from") not in USER_ROLES or bot.get("from") not in ASSISTANT_ROLES:
            return None
        if not (isinstance(user.get("value"), str) and isinstance(bot.get("value"), str)):
            return None
        pairs.append((user["value"], bot["value"]))
    if not pairs:
        return None
    return Dialogue(system=system, pairs=pairs, odd=len(turns) % 2 == 1)


class LlavaSource(Source):
    """LLaVA detail_23k + complex_reasoning_77k: the first (question, answer) of each record."""

    name = "llava"
    files = ("detail_23k.json", "complex_reasoning_77k.json")
    required = (COCO_TRAIN2017, *(llava_file(f) for f in files))

    def records(self, ctx: SourceContext) -> Iterator[Conversation]:
        for file in self.files:
            ann_path = ctx.data_path / "llava" / file
            for index, ann in enumerate(expect_type(read_json(ann_path), list, ann_path, "list")):
                conv_id = f"{self.name}:{Path(file).stem}:{_record_id(ann, index)}"
                dialogue = parse_dialogue(ann)
                if dialogue is None or not isinstance(ann.get("image"), str):
                    ctx.drop("malformed_record", conv_id)
                    continue
                question, answer = dialogue.pairs[0]  # the original used turns 0 and 1 only
                image, reason = coco_image(ctx, ann["image"], self.name)
                if image is None or not placeholders_fit([question], 1):
                    ctx.drop(reason or PLACEHOLDER_MISMATCH, conv_id)
                    continue
                rounds = [(user_text(clean_dsvl_question(question), 1), answer)]
                yield conversation(conv_id, rounds, [image])


class LlavaDialSource(Source):
    """LLaVA conversation_58k: every (question, answer) pair, one image.

    The image is introduced in the first human turn that held `<image>` (the first turn if none).
    """

    name = "llava_dial"
    required = (COCO_TRAIN2017, llava_file("conversation_58k.json"))

    def records(self, ctx: SourceContext) -> Iterator[Conversation]:
        ann_path = ctx.data_path / self.required[1].path
        for index, ann in enumerate(expect_type(read_json(ann_path), list, ann_path, "a list")):
            conv_id = f"{self.name}:{_record_id(ann, index)}"
            dialogue = parse_dialogue(ann)
            if dialogue is None or not isinstance(ann.get("image"), str):
                ctx.drop("malformed_record", conv_id)
                continue
            if dialogue.odd:
                ctx.drop("odd_turns", conv_id)
                continue
            pairs = dialogue.pairs
            image, reason = coco_image(ctx, ann["image"], self.name)
            if image is None or not placeholders_fit([q for q, _ in pairs], 1):
                ctx.drop(reason or PLACEHOLDER_MISMATCH, conv_id)
                continue
            holders = [i for i, (q, _) in enumerate(pairs) if IMAGE_PLACEHOLDER in q]
            first = holders[0] if holders else 0
            rounds = [
                (user_text(clean_dsvl_question(q), int(i == first)), a)
                for i, (q, a) in enumerate(pairs)
            ]
            yield conversation(conv_id, rounds, [image])


def coco_image(ctx: SourceContext, ref: str, source: str) -> tuple[str | None, str]:
    """A LLaVA record's `image`, resolved against the COCO train2017 folder (`resolve_image`)."""
    return resolve_image(ref, ctx.data_path / "coco/train2017", ctx, source)


class LlavaJsonSource(Source):
    """Any LLaVA-format file (JSON list or JSONL): arbitrary rounds, zero or more images.

    `image` is a string, a list, or absent (text-only); paths are relative to `ctx.image_root`
    (default: the file's folder). Each `<image>` in a human turn takes the next image; if no turn
    has one while images exist, all are put in the first turn, as LLaVA does. Placeholders move
    to the start of their turn (the DSVL template shows a round's images before its question).
    """

    name = "llava_json"
    required = ()

    def check(self, ctx: SourceContext) -> list[str]:
        return check_files(ctx, self.name, "llava_instruct.json")

    def records(self, ctx: SourceContext) -> Iterator[Conversation]:
        for ann_path in input_files(ctx):
            root = image_root(ctx, ann_path)
            for index, (where, ann) in enumerate(iter_records(ann_path, ctx)):
                conv = self._record(ctx, ann, root, f"{self.name}:{ann_path.stem}", index, where)
                if conv is not None:
                    yield conv

    def _record(
        self, ctx: SourceContext, ann: Any, root: Path, prefix: str, index: int, where: str
    ) -> Conversation | None:
        """One record -> Conversation, or None after counting why it was dropped."""
        dialogue = parse_dialogue(ann)
        if dialogue is None:
            ctx.drop("malformed_record", where)
            return None
        if dialogue.odd:
            ctx.drop("odd_turns", where)
            return None
        pairs = dialogue.pairs
        refs = ann.get("image", [])
        refs = [refs] if isinstance(refs, str) else refs
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            ctx.drop("malformed_record", where)
            return None
        images = []
        for ref in refs:
            path, reason = resolve_image(ref, root, ctx, self.name)
            if path is None:
                ctx.drop(reason, where)
                return None
            images.append(path)
        if not placeholders_fit([q for q, _ in pairs], len(images)):
            ctx.drop(PLACEHOLDER_MISMATCH, where)
            return None
        counts = [q.count(IMAGE_PLACEHOLDER) for q, _ in pairs]
        if sum(counts) == 0:  # no placeholder: all images go in the first turn, as LLaVA does
            counts[0] = len(images)
        rounds = [
            (user_text(strip_placeholders(q), n), a)
            for (q, a), n in zip(pairs, counts, strict=True)
        ]
        conv_id = f"{prefix}:{_record_id(ann, index)}"
        return conversation(conv_id, rounds, images, system=dialogue.system)


def _record_id(ann: Any, index: int) -> str:
    """The record's own `id` if it has one, else its position in the file."""
    value = ann.get("id") if isinstance(ann, dict) else None
    return str(value) if value is not None else str(index)
