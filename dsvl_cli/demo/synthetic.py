"""The synthetic "shapes" task: a small multi-image, multi-round VQA dataset drawn with PIL.

It backs the CPU demo recipe (`recipes/tiny.yaml`) and the tests. Images show one or two large,
well-separated shapes (circle, square, triangle) in vivid colours (see `shapes.py`). Question
types (`meta["type"]`; the exact answer is `meta["answer"]`, `meta["kind"]` the variant):

- `single`: one image. "What colour is the square?" -> "The square is red." (kind `colour`) or
  "Which shape is red?" -> "It is a red square." (kind `shape`).
- `two_image`: two images. "Which image has a red square, the first or the second?" ->
  "The image with the red square is the first." Exactly one image has it; answers are balanced.
- `multi_round`: round 1 asks a colour about image 1; round 2 brings image 2 and asks which image
  has a shape (kind `which`) or "What colour is the circle in the second image?" ->
  "In the second image, the circle is blue." (kind `colour`). Every answer is supervised;
  `meta["answer"]` is the last one.
- `caption`: "Describe the image." (kind `one_image`) or, with two images, "Describe the second
  image." (kind `one_of_two`) -> "The second image shows a red square and a blue circle." (shapes
  in colour order: red, green, blue, yellow).

Why answers restate the question: a model of two 64-wide layers learns to look a colour up from
the shape name right before it ("the square is" -> red) within a few hundred steps, but learns to
answer a bare "red" to "What colour is the square?" (the shape name seven tokens earlier, behind
the answer header) slowly and unreliably; the restated answers make the demo converge on 2 CPU
cores in minutes. The captions teach shape features and which image is which.

Why a quarter are captions, three quarters of them "Describe the first/second image": binding
a shape to its image is the slow skill. On 2 cores (one thread, 14 epochs at lr 2e-3) with half
of them, seed 1's captions ended at 91.0 % (a shape word from the other image, which held the
same colour); with three quarters, seeds 1 and 2 ended at 100 % (two-image 98.3 / 90.4 %).

`meta["scenes"]` records every drawn shape (type, colour, pixel box) per image, so answers can be
checked against the pixels. Output is byte-identical for a given seed and arguments.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from random import Random
from typing import Any

from dsvl_cli.data.conversation import IMAGE_PLACEHOLDER, Conversation, Message, write_jsonl
from dsvl_cli.demo.shapes import Scene, Shape, describe, draw_scene, random_scene
from dsvl_cli.errors import DataError
from dsvl_cli.log import get_logger

log = get_logger(__name__)

GENERATOR = "dsvl-synthetic-shapes"
GENERATOR_VERSION = 4  # bump whenever the same seed would draw different files
SOURCE = "synthetic"

QUESTION_TYPES: tuple[str, ...] = ("single", "two_image", "multi_round", "caption")
DEFAULT_MIX: dict[str, float] = {
    "single": 0.3,
    "two_image": 0.3,
    "multi_round": 0.15,
    "caption": 0.25,
}
SHAPE_QUESTION_FRACTION = 0.5  # share of `single` samples asking "Which shape is {colour}?"
TWO_IMAGE_CAPTION_FRACTION = 0.75  # share of `caption` samples describing one of two images
ORDINALS = ("first", "second")
OUTPUT_ENTRIES = frozenset({"images", "models", "train.jsonl", "eval.jsonl", "manifest.json"})

Draft = tuple[list[str], list[Scene], str]  # (alternating user/assistant texts, scenes, kind)


def _colour_turns(target: Shape) -> list[str]:
    return [f"What colour is the {target.kind}?", f"The {target.kind} is {target.colour}."]


def _which_turns(target: Shape, answer_index: int) -> list[str]:
    name = f"{target.colour} {target.kind}"
    return [
        f"Which image has a {name}, the first or the second?",
        f"The image with the {name} is the {ORDINALS[answer_index]}.",
    ]


def _which_scenes(rng: Random, size: int, answer_index: int) -> tuple[list[Scene], Shape]:
    """Two scenes of which exactly the one at `answer_index` holds the returned target shape."""
    holder = random_scene(rng, size)
    target = rng.choice(holder)
    other = random_scene(rng, size, exclude=(target.colour, target.kind))
    scenes = [holder, other] if answer_index == 0 else [other, holder]
    return scenes, target


def _with_images(count: int, turns: list[str]) -> list[str]:
    """`turns` with `count` image placeholders (one line each) before the first question."""
    return ["\n".join([IMAGE_PLACEHOLDER] * count + [turns[0]]), *turns[1:]]


def _single(rng: Random, size: int, answer_index: int) -> Draft:
    scene = random_scene(rng, size)
    target = rng.choice(scene)
    if rng.random() < SHAPE_QUESTION_FRACTION:
        turns = [
            f"Which shape is {target.colour}?",
            f"It is a {target.colour} {target.kind}.",
        ]
        return _with_images(1, turns), [scene], "shape"
    return _with_images(1, _colour_turns(target)), [scene], "colour"


def _two_image(rng: Random, size: int, answer_index: int) -> Draft:
    scenes, target = _which_scenes(rng, size, answer_index)
    return _with_images(2, _which_turns(target, answer_index)), scenes, "which"


def _multi_round(rng: Random, size: int, answer_index: int) -> Draft:
    if rng.random() < 0.5:
        scenes, target = _which_scenes(rng, size, answer_index)
        kind, last = "which", _which_turns(target, answer_index)
    else:
        scenes = [random_scene(rng, size), random_scene(rng, size)]
        second = rng.choice(scenes[1])
        kind = "colour"
        last = [
            f"What colour is the {second.kind} in the second image?",
            f"In the second image, the {second.kind} is {second.colour}.",
        ]
    first = rng.choice(scenes[0])
    return _with_images(1, _colour_turns(first)) + _with_images(1, last), scenes, kind


def _caption(rng: Random, size: int, answer_index: int) -> Draft:
    if rng.random() < TWO_IMAGE_CAPTION_FRACTION:
        scenes = [random_scene(rng, size), random_scene(rng, size)]
        ordinal = ORDINALS[answer_index]
        turns = [
            f"Describe the {ordinal} image.",
            f"The {ordinal} image shows {describe(scenes[answer_index])}.",
        ]
        return _with_images(2, turns), scenes, "one_of_two"
    scene = random_scene(rng, size)
    turns = ["Describe the image.", f"The image shows {describe(scene)}."]
    return _with_images(1, turns), [scene], "one_image"


# Each builder takes (rng, image size, planned index of the image the answer is about; builders
# without one ignore it) and returns a Draft.
_BUILDERS = {
    "single": _single,
    "two_image": _two_image,
    "multi_round": _multi_round,
    "caption": _caption,
}


def _type_counts(num: int, mix: Mapping[str, float]) -> dict[str, int]:
    """Split `num` over the types in proportion to `mix` (largest remainder: exact total)."""
    total = sum(mix.values())
    exact = {name: num * mix.get(name, 0.0) / total for name in QUESTION_TYPES}
    counts = {name: int(value) for name, value in exact.items()}
    by_remainder = sorted(QUESTION_TYPES, key=lambda name: counts[name] - exact[name])
    for name in by_remainder[: num - sum(counts.values())]:
        counts[name] += 1
    return counts


def _balanced(rng: Random, count: int) -> list[int]:
    """`count` answer indices, half 0 and half 1 (one extra 0 if odd), in random order."""
    indices = [i % 2 for i in range(count)]
    rng.shuffle(indices)
    return indices


def _make_samples(
    rng: Random, num: int, mix: Mapping[str, float], size: int, root: Path
) -> list[Conversation]:
    """Draw `num` conversations, saving their images as `root`/images/NNNNNN.png."""
    counts = _type_counts(num, mix)
    plan = [name for name in QUESTION_TYPES for _ in range(counts[name])]
    rng.shuffle(plan)
    answer_plan = {name: iter(_balanced(rng, counts[name])) for name in QUESTION_TYPES}
    conversations: list[Conversation] = []
    paths: list[str] = []
    for index, qtype in enumerate(plan):
        turns, scenes, kind = _BUILDERS[qtype](rng, size, next(answer_plan[qtype]))
        first_image = len(paths)
        for scene in scenes:
            paths.append(f"images/{len(paths):06d}.png")
            draw_scene(scene, size).save(root / paths[-1], format="PNG")
        meta = {
            "type": qtype,
            "kind": kind,
            "answer": turns[-1],
            "scenes": [[shape.to_dict() for shape in scene] for scene in scenes],
        }
        messages = [Message("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)]
        conversations.append(
            Conversation(
                messages=messages,
                images=paths[first_image:],
                id=f"shapes-{index:06d}",
                source=SOURCE,
                meta=meta,
            )
        )
    return conversations


def _split(
    conversations: list[Conversation], eval_fraction: float
) -> tuple[list[Conversation], list[Conversation]]:
    """Hold out about `eval_fraction` of every question type (at least one each when possible)."""
    held: set[str] = set()
    for qtype in QUESTION_TYPES:
        ids = [c.id for c in conversations if c.meta["type"] == qtype]
        count = round(len(ids) * eval_fraction)
        if eval_fraction > 0 and len(ids) >= 2:
            count = max(count, 1)
        held.update(ids[:count])
    train = [c for c in conversations if c.id not in held]
    return train, [c for c in conversations if c.id in held]


def conversation_texts(conversations: list[Conversation]) -> list[str]:
    """All message texts (image placeholders removed) and system prompts, for tokenizer training."""
    texts: list[str] = []
    for conv in conversations:
        if conv.system is not None:
            texts.append(conv.system)
        texts.extend(m.content.replace(IMAGE_PLACEHOLDER, "").strip() for m in conv.messages)
    return texts


def _counts_by_type(conversations: list[Conversation]) -> dict[str, int]:
    return {t: sum(c.meta["type"] == t for c in conversations) for t in QUESTION_TYPES}


def _is_previous_output(out: Path) -> bool:
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("generator") == GENERATOR


def _check_out(out: Path) -> None:
    """Accept a missing or empty folder, or a previous synthetic output (to overwrite)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"--out {out} is a file; pass a new or empty folder")
    entries = sorted(p.name for p in out.iterdir())
    if not entries or (_is_previous_output(out) and set(entries) <= OUTPUT_ENTRIES):
        return
    raise DataError(
        f"--out {out} is not empty and is not a previous synthetic output (found "
        f"{', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}); "
        "pass a new or empty folder, or delete it first"
    )


def _swap_in(staging: Path, out: Path) -> None:
    """Move the staged files into `out`, replacing a previous output's; the manifest goes last.

    `out` itself is kept (a shell may sit in it), and it holds a manifest at every moment, so
    an interrupted swap is still recognised, and replaced, by the next run.
    """
    out.mkdir(parents=True, exist_ok=True)
    for name in sorted(OUTPUT_ENTRIES - {"manifest.json"}):
        old, new = out / name, staging / name
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
        if new.exists():
            new.rename(old)
    (staging / "manifest.json").replace(out / "manifest.json")


def _check_args(num: int, eval_fraction: float, image_size: int, mix: Mapping[str, float]) -> None:
    if num < 1:
        raise DataError(f"--num must be at least 1, got {num}")
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"eval fraction must be in [0, 1), got {eval_fraction}")
    if image_size < 16 or image_size % 8:
        raise DataError(f"image size must be a multiple of 8 and at least 16, got {image_size}")
    unknown = sorted(set(mix) - set(QUESTION_TYPES))
    if unknown or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise DataError(
            f"mix {dict(mix)} is invalid: use non-negative weights for {', '.join(QUESTION_TYPES)} "
            "with a positive sum"
        )


def _build_models(models_dir: Path, texts: list[str], image_size: int, seed: int) -> dict:
    """Train the tokenizer and save the tiny LM and CLIP tower under `models_dir`."""
    # Imported here: transformers takes seconds to import and is only needed with models.
    from dsvl_cli.demo.tiny_models import build_tiny_clip, build_tiny_lm, train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(texts)
    build_tiny_lm(models_dir / "lm", tokenizer, seed=seed)
    # One patch per quadrant: each patch token sees one whole shape (see shapes._layout).
    patch = image_size // 2
    build_tiny_clip(models_dir / "vision", image_size=image_size, patch_size=patch, seed=seed)
    return {"lm": "models/lm", "vision": "models/vision", "vocab_size": len(tokenizer)}


def _write(
    staging: Path,
    num: int,
    seed: int,
    eval_fraction: float,
    image_size: int,
    mix: Mapping[str, float],
    with_models: bool,
) -> dict[str, Any]:
    """Write the whole dataset into `staging` and return its manifest."""
    (staging / "images").mkdir(parents=True)
    conversations = _make_samples(Random(seed), num, mix, image_size, staging)
    train, held_out = _split(conversations, eval_fraction)
    write_jsonl(staging / "train.jsonl", train)
    write_jsonl(staging / "eval.jsonl", held_out)
    models = None
    if with_models:
        models = _build_models(staging / "models", conversation_texts(train), image_size, seed)
    manifest = {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "eval_fraction": eval_fraction,
        "mix": {name: float(mix.get(name, 0.0)) for name in QUESTION_TYPES},
        "counts": {
            "total": len(conversations),
            "train": len(train),
            "eval": len(held_out),
            "images": sum(c.num_images for c in conversations),
            "by_type": {"train": _counts_by_type(train), "eval": _counts_by_type(held_out)},
        },
        "files": {"train": "train.jsonl", "eval": "eval.jsonl", "images": "images"},
        "models": models,
    }
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    (staging / "manifest.json").write_text(text, encoding="utf-8")
    return manifest


def generate_synthetic(
    out: Path,
    num: int,
    seed: int = 0,
    eval_fraction: float = 0.1,
    image_size: int = 32,
    with_models: bool = True,
    mix: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Write the shapes dataset (and tiny base models) to `out`.

    Layout: `images/NNNNNN.png`, `train.jsonl`, `eval.jsonl` (image paths relative to `out`),
    `manifest.json` (counts, seed, sizes, generator version; no timestamps or absolute paths),
    and with `with_models`: `models/lm/` (tokenizer + LLaMA LM) and `models/vision/` (CLIP tower
    + image processor). The same arguments give byte-identical files.

    Args:
        out: output folder; must be missing, empty, or a previous synthetic output (replaced).
        num: number of conversations.
        seed: random seed for data and model weights.
        eval_fraction: share of each question type held out in eval.jsonl.
        image_size: image side in pixels (multiple of 8; also the CLIP input size).
        with_models: also train the tokenizer and save the tiny models.
        mix: relative weights of "single", "two_image", "multi_round", "caption" (default
            0.3/0.3/0.15/0.25).

    Returns:
        The manifest as written.

    Raises:
        DataError: bad arguments, or `out` holds something other than a synthetic output.
    """
    out = Path(out).absolute()  # so "." has a name and a parent for the staging folder
    mix = dict(DEFAULT_MIX if mix is None else mix)
    _check_args(num, eval_fraction, image_size, mix)
    _check_out(out)
    # Build beside `out` and swap in at the end, so a crash never leaves a half-written dataset.
    staging = out.parent / f".{out.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        manifest = _write(staging, num, seed, eval_fraction, image_size, mix, with_models)
        _swap_in(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    counts = manifest["counts"]
    log.info(
        "wrote %d synthetic conversations (%d train, %d eval, %d images) to %s",
        counts["total"],
        counts["train"],
        counts["eval"],
        counts["images"],
        out,
    )
    return manifest
