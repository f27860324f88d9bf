"""sparkles_dialogue: SparklesDialogueCC + SparklesDialogueVG multi-image dialogues.

Raw: a JSON list of `{"dialogue": [{"role": "user"|"assistant", "content", "images":
[{"image_id"}]}]}` per subset, images at `<subset>/images/<image_id>.jpg`.

Filtering as the original's one-time cache (each counted): an odd number of turns ("odd_turns"),
roles not strictly user/assistant alternating ("bad_roles"), more than min(8, ctx.max_images)
images ("too_many_images"), an image file that does not exist ("missing_image": checked here with
a cheap stat because the original's filter depended on it), images attached to an assistant turn
("assistant_image": the original loaded them without a placeholder), a user turn whose `<image>`
count is neither 0 nor its image count ("placeholder_mismatch"; Sparkles' own
`<Img><ImageHere></Img>` marker is removed, as the original did, whatever its count).

Text (§2.8 item 5): one tag style per dialogue, drawn once from `ctx.rng`; the k-th image gets the
k-th tag and `IMAGE#<id>` is replaced by it in that round and later ones. Questions lose
`<Img><ImageHere></Img>` and newlines. Sentence-initial words are capitalised by upper-casing their
first letter only (the original's `str.capitalize` turned "NASA" into "Nasa").
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dsvl_cli.data.conversation import IMAGE_PLACEHOLDER, Conversation
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
    user_text,
)
from dsvl_cli.data.sources.prompts import SPARKLES_TAG_STYLES

SUBSETS = ("SparklesDialogueCC", "SparklesDialogueVG")
SPARKLES_HINT = (
    "download the SparklesDialogueCC and SparklesDialogueVG folders from the OneDrive link at "
    "https://github.com/HYPJUDY/Sparkles and save them at {data_path}/"
)
IMAGE_HERE = "<Img><ImageHere></Img>"
SENTENCE_START = re.compile(r"((?<=[\.\?!]\s)(\w+)|(^\w+))")


def capitalise_sentences(text: str) -> str:
    """Upper-case the first letter of the first word and of each word after `. `, `? `, `! `."""
    return SENTENCE_START.sub(lambda m: m.group()[0].upper() + m.group()[1:], text)


def replace_tags(text: str, tags: dict[str, str]) -> str:
    """Replace each `IMAGE#<id>` of `tags` in one pass (longest id first: no id eats another)."""
    if not tags:
        return text
    ids = sorted(tags, key=len, reverse=True)
    pattern = re.compile("IMAGE#(" + "|".join(re.escape(i) for i in ids) + r")(?!\w)")
    return pattern.sub(lambda m: tags[m.group(1)], text)


class SparklesSource(Source):
    """Multi-image, multi-round dialogues; each round introduces the images it attaches."""

    name = "sparkles_dialogue"
    required = tuple(
        entry
        for subset in SUBSETS
        for entry in (
            RequiredFile(f"{subset}/images", "dir", SPARKLES_HINT),
            RequiredFile(f"{subset}/annotations/{subset}.json", "file", SPARKLES_HINT),
        )
    )

    def records(self, ctx: SourceContext) -> Iterator[Conversation]:
        limit = min(len(SPARKLES_TAG_STYLES[0]), ctx.max_images)
        for subset in SUBSETS:
            path = ctx.data_path / subset / "annotations" / f"{subset}.json"
            image_dir = ctx.data_path / subset / "images"
            for index, record in enumerate(expect_type(read_json(path), list, path, "a list")):
                raw_id = record.get("dialogue_id", index) if isinstance(record, dict) else index
                conv_id = f"{self.name}:{subset.removeprefix('SparklesDialogue')}:{raw_id}"
                turns = _turns(record)
                reason = "malformed_record" if turns is None else _problem(turns, image_dir, limit)
                if reason:
                    ctx.drop(reason, conv_id)
                    continue
                yield self._conversation(ctx, conv_id, turns, image_dir)

    def _conversation(
        self, ctx: SourceContext, conv_id: str, turns: list[dict[str, Any]], image_dir: Path
    ) -> Conversation:
        """Tag images, clean and capitalise texts, introduce each round's images at its start."""
        style = choose(ctx.rng, SPARKLES_TAG_STYLES, bool) or SPARKLES_TAG_STYLES[0]
        tags: dict[str, str] = {}
        images: list[Path] = []
        rounds = []
        for user, assistant in zip(turns[0::2], turns[1::2], strict=True):
            ids = _image_ids(user)
            for image_id in ids:
                tags.setdefault(image_id, style[len(images)])
                images.append(image_dir / f"{image_id}.jpg")
            question = user["content"].replace(IMAGE_HERE, "").replace(IMAGE_PLACEHOLDER, "")
            question = question.replace("\n", "")
            question = capitalise_sentences(replace_tags(question, tags))
            answer = capitalise_sentences(replace_tags(assistant["content"], tags))
            rounds.append((user_text(question, len(ids)), answer))
        return conversation(conv_id, rounds, images)


def _turns(record: Any) -> list[dict[str, Any]] | None:
    """The dialogue's turns if each is an object with string role and content, else None."""
    turns = record.get("dialogue") if isinstance(record, dict) else None
    if not isinstance(turns, list) or not turns:
        return None
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            return None
        if _image_ids(turn) is None:
            return None
    return turns


def _image_ids(turn: dict[str, Any]) -> list[str] | None:
    """The turn's attached image ids, in order ([] if none, None if malformed)."""
    images = turn.get("images", [])
    if not isinstance(images, list) or not all(
        isinstance(i, dict) and "image_id" in i for i in images
    ):
        return None
    return [str(i["image_id"]) for i in images]


def _problem(turns: list[dict[str, Any]], image_dir: Path, limit: int) -> str:
    """The filter reason for a dialogue, or "" if it is kept (cheapest checks first)."""
    if len(turns) % 2:
        return "odd_turns"
    if any(t.get("role") != ("user" if i % 2 == 0 else "assistant") for i, t in enumerate(turns)):
        return "bad_roles"
    if any(_image_ids(t) for t in turns[1::2]):
        return "assistant_image"
    if not all(placeholders_fit([t["content"]], len(_image_ids(t) or [])) for t in turns[0::2]):
        return PLACEHOLDER_MISMATCH
    ids = [i for t in turns[0::2] for i in _image_ids(t) or []]
    if len(ids) > limit:
        return "too_many_images"
    if not all((image_dir / f"{i}.jpg").is_file() for i in ids):
        return "missing_image"
    return ""
