"""llava_otter_blend: LLaVA conversations about each COCO image, then the MIMIC-IT CGD QAs that
compare the images, as the original's blend does.

Per CGD group (instructions merged through `rel_ins_ids`, heads visited in file order, as the
original's otter cache), with images `im_1..im_m`:
1. For each image in order that has LLaVA conversations, draw how many to use, uniformly in
   [1, count] ([0, count] for the last image), and pick that many without replacement. Their
   (question, answer) pairs follow; an image is introduced (`<image>`) on its first round.
2. Then EVERY CGD QA of the group, in a random order; the first introduces the images not yet
   introduced (in practice only the last can be). The original drew a random 1..n subset per
   access; with draws made once at prepare time that would discard QAs for good, so all are kept.
Only usable LLaVA dialogues are candidates (see `llava_by_image`). A group is dropped
("no_llava_conversation") unless every image except the last has a LLaVA conversation: otherwise
the images could not be introduced in order. Draws come from `ctx.rng`, once. Questions lose
`<image>` and newlines (parity). Image existence is left to prepare.py.
"""

from __future__ import annotations

from collections.abc import Iterator

from dsvl_cli.data.conversation import Conversation
from dsvl_cli.data.json_files import read_json
from dsvl_cli.data.sources.base import (
    PLACEHOLDER_MISMATCH,
    Source,
    SourceContext,
    clean_dsvl_question,
    conversation,
    expect_type,
    placeholders_fit,
    usable_text,
    user_text,
)
from dsvl_cli.data.sources.llava import Dialogue, llava_file, parse_dialogue
from dsvl_cli.data.sources.otter import (
    QaGroup,
    cgd_image_names,
    merge_related,
    mimicit_file,
    read_instructions,
)
from dsvl_cli.data.sources.vqa import COCO_TRAIN2017

LLAVA_FILES = ("detail_23k.json", "complex_reasoning_77k.json", "conversation_58k.json")


class LlavaOtterBlendSource(Source):
    """LLaVA rounds per image followed by the CGD rounds about all images together."""

    name = "llava_otter_blend"
    required = (
        COCO_TRAIN2017,
        *(llava_file(f) for f in LLAVA_FILES),
        mimicit_file("CGD_instructions.json", "CGD_instructions.json"),
    )

    def records(self, ctx: SourceContext) -> Iterator[Conversation]:
        llava = llava_by_image(ctx, self.name)
        data = read_instructions(ctx, "CGD")

        def select(image_ids: list[str]) -> tuple[list[str] | None, str]:
            names = cgd_image_names(image_ids)
            if names is None:
                return None, "malformed_record"
            if any(name not in llava for name in names[:-1]):
                return None, "no_llava_conversation"
            return names, ""

        for group in merge_related(data, list(data), select, ctx, self.name):
            yield self._blend(ctx, group, llava)

    def _blend(
        self, ctx: SourceContext, group: QaGroup, llava: dict[str, list[Dialogue]]
    ) -> Conversation:
        """One sample: drawn LLaVA rounds per image, then all CGD QAs in a random order."""
        names = group.images
        introduced: list[int] = []
        rounds: list[tuple[str, str]] = []
        for idx, name in enumerate(names):
            dialogues = llava.get(name, [])
            if not dialogues:
                continue
            low = 1 if idx < len(names) - 1 else 0
            count = ctx.rng.randint(low, len(dialogues))
            for pick in ctx.rng.sample(range(len(dialogues)), count):
                for question, answer in dialogues[pick].pairs:
                    new = idx not in introduced
                    if new:
                        introduced.append(idx)
                    rounds.append((user_text(clean_dsvl_question(question), int(new)), answer))
        llava_rounds = len(rounds)
        remaining = [i for i in range(len(names)) if i not in introduced]
        order = list(range(len(group.qas)))
        ctx.rng.shuffle(order)
        for position, index in enumerate(order):
            question, answer = group.qas[index]
            count = len(remaining) if position == 0 else 0
            rounds.append((user_text(clean_dsvl_question(question), count), answer))
        root = ctx.data_path / "coco/train2017"
        images = [root / names[i] for i in introduced + remaining]
        meta = {"ins_ids": group.ins_ids, "llava_rounds": llava_rounds}
        return conversation(f"{self.name}:{group.ins_ids[0]}", rounds, images, meta=meta)


def llava_by_image(ctx: SourceContext, name: str) -> dict[str, list[Dialogue]]:
    """COCO file name -> its LLaVA dialogues over the three LLaVA files (the original's cache).

    These are the candidates the blend draws from, so only usable ones enter: a malformed record
    is counted as "malformed_llava_record", one with more than one `<image>` as
    "placeholder_mismatch", one with a blank question or answer as "blank_llava_record".
    """
    index: dict[str, list[Dialogue]] = {}
    for file in LLAVA_FILES:
        path = ctx.data_path / "llava" / file
        for position, record in enumerate(expect_type(read_json(path), list, path, "a list")):
            dialogue = parse_dialogue(record)
            image = record.get("image") if isinstance(record, dict) else None
            reason = _unusable(dialogue) if isinstance(image, str) else "malformed_llava_record"
            if reason:  # _unusable(None) is "malformed_llava_record": dialogue is set below
                ctx.drop(reason, f"{name}:{file}[{position}]")
                continue
            index.setdefault(image, []).append(dialogue)
    return index


def _unusable(dialogue: Dialogue | None) -> str:
    """Why a LLaVA dialogue cannot be blended in ("" if it can)."""
    if dialogue is None:
        return "malformed_llava_record"
    questions = [q for q, _ in dialogue.pairs]
    if not placeholders_fit(questions, 1):
        return PLACEHOLDER_MISMATCH
    if not all(usable_text(clean_dsvl_question(q)) and usable_text(a) for q, a in dialogue.pairs):
        return "blank_llava_record"
    return ""
