"""The synthetic shapes task: determinism, counts, valid records, answers true to the pixels."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from dsvl_cli.data.conversation import IMAGE_PLACEHOLDER, Conversation, read_jsonl  # noqa: E402
from dsvl_cli.demo.shapes import BACKGROUND, COLOURS  # noqa: E402
from dsvl_cli.demo.synthetic import conversation_texts, generate_synthetic  # noqa: E402
from dsvl_cli.errors import DataError  # noqa: E402

NUM = 40


def tree_hashes(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "a"
    generate_synthetic(out, NUM, seed=0)
    return out


def load(out: Path) -> tuple[list[Conversation], list[Conversation], dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return list(read_jsonl(out / "train.jsonl")), list(read_jsonl(out / "eval.jsonl")), manifest


def test_same_seed_is_byte_identical_and_other_seed_differs(dataset, tmp_path):
    generate_synthetic(tmp_path / "b", NUM, seed=0)
    first, second = tree_hashes(dataset), tree_hashes(tmp_path / "b")
    assert first == second
    assert {"models/lm/model.safetensors", "models/vision/model.safetensors"} <= set(first)
    assert "images/000000.png" in first
    generate_synthetic(tmp_path / "c", NUM, seed=1, with_models=False)
    other = tree_hashes(tmp_path / "c")
    assert other["train.jsonl"] != first["train.jsonl"]
    assert other["images/000000.png"] != first["images/000000.png"]
    assert not (tmp_path / "c" / "models").exists()


def test_manifest_counts_match_files(dataset):
    train, held_out, manifest = load(dataset)
    counts = manifest["counts"]
    assert (counts["total"], counts["train"], counts["eval"]) == (NUM, len(train), len(held_out))
    assert counts["images"] == sum(c.num_images for c in train + held_out)
    assert counts["images"] == len(list((dataset / "images").glob("*.png")))
    for split, convs in (("train", train), ("eval", held_out)):
        for qtype, n in counts["by_type"][split].items():
            assert n == sum(c.meta["type"] == qtype for c in convs)
    assert manifest["seed"] == 0 and manifest["image_size"] == 32
    assert manifest["generator"] == "dsvl-synthetic-shapes" and manifest["version"] >= 1
    assert manifest["models"]["lm"] == "models/lm"
    assert str(dataset) not in (dataset / "manifest.json").read_text()  # no absolute paths


def test_type_mix_split_and_balance(dataset):
    train, held_out, _ = load(dataset)
    everything = train + held_out
    by_type = {t: [c for c in everything if c.meta["type"] == t] for t in ("single", "two_image")}
    assert len(by_type["single"]) == 12 and len(by_type["two_image"]) == 12  # 30 % of 40 each
    assert sum(c.meta["type"] == "multi_round" for c in everything) == 6
    assert sum(c.meta["type"] == "caption" for c in everything) == 10
    answers = [c.meta["answer"] for c in by_type["two_image"]]
    assert sum(a.endswith("is the first.") for a in answers) == 6
    assert sum(a.endswith("is the second.") for a in answers) == 6
    assert {c.meta["type"] for c in held_out} == {"single", "two_image", "multi_round", "caption"}
    assert len(held_out) == 4  # 10% of each type, at least one each
    ids = [c.id for c in everything]
    assert len(set(ids)) == NUM and not {c.id for c in train} & {c.id for c in held_out}


def test_records_validate_and_images_open(dataset):
    train, held_out, _ = load(dataset)
    for conv in train + held_out:
        conv.validate()
        assert conv.source == "synthetic"
        assert sum(m.num_images for m in conv.messages) == conv.num_images
        assert conv.messages[-1].content == conv.meta["answer"]
        expected_images = {"single": 1, "two_image": 2, "multi_round": 2}.get(conv.meta["type"])
        if expected_images is None:  # caption: "Describe the image." or one of two images
            expected_images = 1 if conv.meta["kind"] == "one_image" else 2
        assert conv.num_images == expected_images and len(conv.meta["scenes"]) == expected_images
        for rel in conv.images:
            assert not Path(rel).is_absolute()
            with Image.open(dataset / rel) as image:
                assert image.size == (32, 32) and image.mode == "RGB"


def _name(scene: list[dict], **match: str) -> tuple[str, str]:
    """(colour, shape) of the one shape in `scene` with the given shape or colour."""
    (found,) = [s for s in scene if all(s[key] == value for key, value in match.items())]
    return found["colour"], found["shape"]


def _expected_answer(question: str, scenes: list[list[dict]], image_index: int) -> str:
    """Answer a question from the recorded scenes alone (independent of the generator)."""
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        colour, shape = _name(scenes[image_index], shape=m.group(1))
        return f"The {shape} is {colour}."
    if m := re.fullmatch(r"What colour is the (\w+) in the second image\?", question):
        colour, shape = _name(scenes[1], shape=m.group(1))
        return f"In the second image, the {shape} is {colour}."
    if m := re.fullmatch(r"Which shape is (\w+)\?", question):
        colour, shape = _name(scenes[image_index], colour=m.group(1))
        return f"It is a {colour} {shape}."
    if m := re.fullmatch(r"Describe the (image|first image|second image)\.", question):
        scene = scenes[{"image": image_index, "first image": 0, "second image": 1}[m.group(1)]]
        ordered = sorted(scene, key=lambda s: list(COLOURS).index(s["colour"]))  # colour order
        shapes = " and ".join(f"a {s['colour']} {s['shape']}" for s in ordered)
        return f"The {m.group(1)} shows {shapes}."
    m = re.fullmatch(r"Which image has a (\w+) (\w+), the first or the second\?", question)
    assert m, question
    has = [any((s["colour"], s["shape"]) == m.groups() for s in scene) for scene in scenes]
    assert sum(has) == 1, (question, scenes)
    which = "first" if has[0] else "second"
    return f"The image with the {m.group(1)} {m.group(2)} is the {which}."


def test_every_answer_is_true_to_the_scene(dataset):
    train, held_out, _ = load(dataset)
    for conv in train + held_out:
        scenes = conv.meta["scenes"]
        seen_images = 0
        for user, assistant in conv.rounds:
            seen_images += user.num_images
            question = user.content.replace(IMAGE_PLACEHOLDER + "\n", "")
            expected = _expected_answer(question, scenes, seen_images - 1)
            assert assistant is not None and assistant.content == expected, conv.id


def test_scenes_match_the_pixels(dataset):
    train, held_out, _ = load(dataset)
    for conv in (train + held_out)[:15]:
        for rel, scene in zip(conv.images, conv.meta["scenes"], strict=True):
            with Image.open(dataset / rel) as image:
                pixels = image.convert("RGB")
            assert pixels.getpixel((0, 0)) == BACKGROUND
            kinds = [s["shape"] for s in scene]
            colours = [s["colour"] for s in scene]
            assert len(set(kinds)) == len(kinds) and len(set(colours)) == len(colours)
            quadrants = set()
            for shape in scene:
                x0, y0, x1, y1 = shape["box"]
                # Each shape lies inside one quadrant (one 16-pixel vision patch), its own.
                half = image.width // 2
                quadrant = (x0 // half, y0 // half)
                assert quadrant == (x1 // half, y1 // half) and quadrant not in quadrants
                quadrants.add(quadrant)
                centre = ((x0 + x1) // 2, (y0 + y1) // 2)
                assert pixels.getpixel(centre) == COLOURS[shape["colour"]]
                # A square fills its box corner, a circle and a triangle leave it empty.
                corner_filled = pixels.getpixel((x0, y1)) == COLOURS[shape["colour"]]
                top_corner_filled = pixels.getpixel((x0, y0)) == COLOURS[shape["colour"]]
                assert corner_filled == (shape["shape"] != "circle")
                assert top_corner_filled == (shape["shape"] == "square")


def test_rerun_into_same_folder_overwrites_cleanly(dataset, tmp_path):
    before = tree_hashes(dataset)
    generate_synthetic(dataset, NUM, seed=0)
    assert tree_hashes(dataset) == before
    out = tmp_path / "small"
    generate_synthetic(out, 10, seed=0)
    generate_synthetic(out, 6, seed=0, with_models=False)
    assert not (out / "models").exists()
    assert (
        len(list((out / "images").glob("*.png")))
        == json.loads((out / "manifest.json").read_text())["counts"]["images"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small"]  # no staging left behind


def test_foreign_or_mixed_folders_are_refused(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a previous synthetic output"):
        generate_synthetic(foreign, 4, with_models=False)
    assert (foreign / "notes.txt").read_text() == "mine"
    mixed = tmp_path / "mixed"
    generate_synthetic(mixed, 4, with_models=False)
    (mixed / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="notes.txt"):
        generate_synthetic(mixed, 4, with_models=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text('{"generator": "something-else"}')
    with pytest.raises(DataError):
        generate_synthetic(other, 4, with_models=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert generate_synthetic(empty, 4, with_models=False)["counts"]["total"] == 4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num": 0},
        {"num": 4, "eval_fraction": 1.0},
        {"num": 4, "image_size": 30},
        {"num": 4, "mix": {"single": 1.0, "captions": 1.0}},
        {"num": 4, "mix": {"single": 0.0}},
    ],
)
def test_bad_arguments_raise_data_error(tmp_path, kwargs):
    with pytest.raises(DataError):
        generate_synthetic(tmp_path / "out", with_models=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_custom_mix_and_image_size(tmp_path):
    manifest = generate_synthetic(
        tmp_path / "out", 10, image_size=48, mix={"two_image": 1.0}, with_models=False
    )
    assert manifest["counts"]["by_type"]["train"]["single"] == 0
    assert manifest["counts"]["by_type"]["train"]["two_image"] == 9
    with Image.open(tmp_path / "out" / "images" / "000000.png") as image:
        assert image.size == (48, 48)


def test_conversation_texts_has_all_text_without_placeholders(dataset):
    train, _, _ = load(dataset)
    texts = conversation_texts(train)
    assert len(texts) == sum(len(c.messages) for c in train)
    assert not any(IMAGE_PLACEHOLDER in t for t in texts)
    assert {c.meta["answer"] for c in train} <= set(texts)
