"""Source adapters, part 2: MIMIC-IT (rel_ins_ids merges, base64 images), llava_otter_blend,
sparkles_dialogue. Fixtures are written into tmp_path in each dataset's published layout."""

from __future__ import annotations

import base64
import io
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from dsvl_cli.data.sources import SourceContext, get_source
from dsvl_cli.data.sources.prompts import SPARKLES_TAG_STYLES

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_ctx(data: Path, seed: int = 0, **kwargs: Any) -> SourceContext:
    return SourceContext(
        data_path=data, image_out=data.parent / "out" / "images", rng=random.Random(seed), **kwargs
    )


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def load(name: str, data: Path, seed: int = 0, **kwargs: Any) -> tuple[list, SourceContext]:
    ctx = make_ctx(data, seed, **kwargs)
    source = get_source(name)
    assert source.check(ctx) == []
    return list(source.load(ctx)), ctx


def jpeg_bytes(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 6), colour).save(buf, format="JPEG")
    return buf.getvalue()


def ins(question: str, answer: str, images: list[str], related: list[str]) -> dict[str, Any]:
    return {"instruction": question, "answer": answer, "image_ids": images, "rel_ins_ids": related}


# --- MIMIC-IT -----------------------------------------------------------------------------------


def _cgd_fixture(data: Path) -> None:
    (data / "coco/train2017").mkdir(parents=True)
    pair = ["CGD_IMG_000000000001", "CGD_IMG_000000000002"]
    raw = {
        "CGD_INS_1": ins("What differs?\n", "The colour.", pair, ["CGD_INS_2", "CGD_INS_3"]),
        # One <image> per image of the group: kept, placeholders cleaned as the original did.
        "CGD_INS_2": ins(
            "<image><image>Which is bigger?", "The left.", pair, ["CGD_INS_1", "CGD_INS_3"]
        ),
        "CGD_INS_3": ins("Same scene?", "No.", pair, ["CGD_INS_1", "CGD_INS_2"]),
        "CGD_INS_4": ins("Alone?", "Yes.", ["CGD_IMG_000000000003"], []),
        "CGD_INS_5": {"instruction": "No answer", "image_ids": pair, "rel_ins_ids": []},
        "CGD_INS_6": ins("Foreign image id?", "Yes.", ["SD_IMG_1"], []),
    }
    write_json(data / "MIMIC-IT/CGD_instructions.json", {"meta": {}, "data": raw})


def test_cgd_merges_related_instructions_and_uses_every_qa(tmp_path: Path) -> None:
    _cgd_fixture(tmp_path)
    convs, ctx = load("otter_mimicit_cgd", tmp_path)
    assert ctx.drops == {"malformed_record": 2}
    by_size = sorted(convs, key=lambda c: len(c.messages))
    single, merged = by_size
    assert single.id == "otter_mimicit_cgd:CGD_INS_4"
    assert single.images == [str(tmp_path / "coco/train2017/000000000003.jpg")]
    assert [m.content for m in single.messages] == ["<image>\nAlone?", "Yes."]
    assert merged.images == [
        str(tmp_path / "coco/train2017/000000000001.jpg"),
        str(tmp_path / "coco/train2017/000000000002.jpg"),
    ]
    assert sorted(merged.meta["ins_ids"]) == ["CGD_INS_1", "CGD_INS_2", "CGD_INS_3"]
    users = [m.content for m in merged.messages if m.role == "user"]
    answers = [m.content for m in merged.messages if m.role == "assistant"]
    assert len(users) == 3  # all QAs of the group, not only the first
    assert users[0].startswith("<image>\n<image>\n") and users[0].count("<image>") == 2
    assert all("<image>" not in u for u in users[1:])
    questions = sorted(u.replace("<image>\n", "") for u in users)
    assert questions == ["Same scene?", "What differs?", "Which is bigger?"]  # cleaned
    pairs = {u.replace("<image>\n", ""): a for u, a in zip(users, answers, strict=True)}
    assert pairs["Which is bigger?"] == "The left." and pairs["Same scene?"] == "No."


def test_cgd_round_order_is_seeded(tmp_path: Path) -> None:
    _cgd_fixture(tmp_path)
    first = [c.to_dict() for c in load("otter_mimicit_cgd", tmp_path, seed=5)[0]]
    again = [c.to_dict() for c in load("otter_mimicit_cgd", tmp_path, seed=5)[0]]
    assert first == again
    orders = set()
    for seed in range(10):
        convs = load("otter_mimicit_cgd", tmp_path, seed=seed)[0]
        merged = max(convs, key=lambda c: len(c.messages))
        orders.add(tuple(m.content for m in merged.messages))
    assert len(orders) > 1


def _base64_fixture(data: Path, subset: str) -> dict[str, bytes]:
    good = {f"{subset}_IMG_1": jpeg_bytes((255, 0, 0)), f"{subset}_IMG_2": jpeg_bytes((0, 0, 255))}
    blobs = {k: base64.b64encode(v).decode() for k, v in good.items()}
    blobs[f"{subset}_IMG_bad"] = "not base64 at all!!"
    blobs[f"{subset}_IMG_3"] = blobs[f"{subset}_IMG_1"]
    write_json(data / f"MIMIC-IT/{subset}.json", blobs)
    i1, i2, i3 = (f"{subset}_IMG_{k}" for k in (1, 2, 3))
    raw = {
        "INS_1": ins("Describe both.", "Red, blue.", [i1, f"{subset}_IMG_gone", i2], ["INS_2"]),
        "INS_2": ins("Which first?", "Red.", [i1, i2], ["INS_1"]),
        "INS_3": ins("Broken?", "Yes.", [f"{subset}_IMG_bad"], []),
        "INS_4": ins("Missing?", "Yes.", [f"{subset}_IMG_gone"], []),
        "INS_5": ins("Three?", "Yes.", [i1, i2, i3], []),
    }
    write_json(data / f"MIMIC-IT/{subset}_instructions.json", {"data": raw})
    return good


@pytest.mark.parametrize("subset", ["SD", "SN", "TVC", "VST"])
def test_base64_sources_decode_images_once(subset: str, tmp_path: Path) -> None:
    name = f"otter_mimicit_{subset.lower()}"
    good = _base64_fixture(tmp_path / "raw", subset)
    convs, ctx = load(name, tmp_path / "raw", max_images=2)
    (conv,) = convs
    assert conv.id in (f"{name}:INS_1", f"{name}:INS_2")  # the head is whichever comes first
    # The unknown image id is counted each time a head names it: INS_4, and INS_1 if a head.
    missing = 2 if conv.id.endswith("INS_1") else 1
    assert ctx.drops == {"missing_image_data": missing, "no_images": 1, "bad_image_data": 1,
                         "too_many_images": 1}  # fmt: skip
    rel = [f"images/{name}/{subset}_IMG_1.jpg", f"images/{name}/{subset}_IMG_2.jpg"]
    assert conv.images == rel  # relative to the prepared JSONL's folder; missing id left out
    written = ctx.image_out / name / f"{subset}_IMG_1.jpg"
    assert written.read_bytes() == good[f"{subset}_IMG_1"]
    assert (ctx.image_out.parent / rel[1]).read_bytes() == good[f"{subset}_IMG_2"]
    assert sorted(p.name for p in (ctx.image_out / name).iterdir()) == [
        f"{subset}_IMG_1.jpg",
        f"{subset}_IMG_2.jpg",
    ]  # only images of kept groups
    assert len(conv.messages) == 4 and conv.messages[0].content.count("<image>") == 2
    stamp = written.stat().st_mtime_ns
    os.utime(written, ns=(stamp - 10**9, stamp - 10**9))
    load(name, tmp_path / "raw", max_images=2)
    assert written.stat().st_mtime_ns == stamp - 10**9  # same size already there: not rewritten


# --- llava_otter_blend ---------------------------------------------------------------------------


def _turns(*values: str) -> list[dict[str, str]]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def _blend_fixture(data: Path) -> None:
    (data / "coco/train2017").mkdir(parents=True)
    write_json(data / "llava/detail_23k.json", [
        {"id": "a", "image": "a.jpg", "conversations": _turns("<image>\nDescribe a.", "A.")},
    ])  # fmt: skip
    write_json(data / "llava/complex_reasoning_77k.json", [
        {"id": "a", "image": "a.jpg", "conversations": _turns("Why a?", "Because.")},
    ])  # fmt: skip
    write_json(data / "llava/conversation_58k.json", [
        {"id": "b", "image": "b.jpg", "conversations": _turns("What is\nb?", "B.", "More?", "No.")},
    ])  # fmt: skip
    pair, reversed_pair = ["CGD_IMG_a", "CGD_IMG_b"], ["CGD_IMG_c", "CGD_IMG_a"]
    raw = {
        "CGD_INS_1": ins("Compare them.", "Different.", pair, ["CGD_INS_2"]),
        "CGD_INS_2": ins("Which is left?", "a.", pair, ["CGD_INS_1"]),
        "CGD_INS_3": ins("No llava for c.", "Dropped.", reversed_pair, []),
    }
    write_json(data / "MIMIC-IT/CGD_instructions.json", {"data": raw})


def test_llava_otter_blend(tmp_path: Path) -> None:
    _blend_fixture(tmp_path)
    llava_questions = {"Describe a.", "Why a?", "What isb?", "More?"}
    for seed in range(8):
        convs, ctx = load("llava_otter_blend", tmp_path, seed=seed)
        assert ctx.drops == {"no_llava_conversation": 1}
        (conv,) = convs
        assert conv.id == "llava_otter_blend:CGD_INS_1"
        root = tmp_path / "coco/train2017"
        assert conv.images == [str(root / "a.jpg"), str(root / "b.jpg")]
        users = [m.content for m in conv.messages if m.role == "user"]
        n_llava = conv.meta["llava_rounds"]
        assert n_llava >= 1 and users[0].startswith("<image>\n")  # a is introduced first
        assert {u.replace("<image>\n", "") for u in users[:n_llava]} <= llava_questions
        cgd = [u.replace("<image>\n", "") for u in users[n_llava:]]
        assert sorted(cgd) == ["Compare them.", "Which is left?"]  # every CGD QA kept
        assert sum(u.count("<image>") for u in users) == 2
        assert users[n_llava + 1].count("<image>") == 0


# --- sparkles_dialogue ---------------------------------------------------------------------------


def _user(content: str, *image_ids: int) -> dict[str, Any]:
    turn: dict[str, Any] = {"role": "user", "content": content}
    if image_ids:
        turn["images"] = [{"image_id": i} for i in image_ids]
    return turn


def _bot(content: str) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


def _sparkles_fixture(data: Path) -> None:
    for subset in ("CC", "VG"):
        (data / f"SparklesDialogue{subset}/images").mkdir(parents=True)
    for image_id in (11, 111, 7):
        (data / f"SparklesDialogueCC/images/{image_id}.jpg").write_bytes(b"jpeg")
    good = {"dialogue_id": "d1", "dialogue": [
        _user("<Img><ImageHere></Img> compare IMAGE#11 and\nIMAGE#111. is the NASA logo there?",
              11, 111),
        _bot("in IMAGE#111 the logo is visible. NASA made IMAGE#11. IMAGE#11 shows none."),
        _user("and IMAGE#7? tell me.", 7),
        _bot("IMAGE#7 resembles IMAGE#11."),
    ]}  # fmt: skip
    dialogues_cc = [
        good,
        {"dialogue": [_user("odd", 11)]},
        {"dialogue": [_user("many", *range(100, 109)), _bot("nine images")]},
        {"dialogue": [_user("missing", 404), _bot("gone")]},
        {"dialogue": [_bot("wrong"), _user("order", 11)]},
    ]
    write_json(data / "SparklesDialogueCC/annotations/SparklesDialogueCC.json", dialogues_cc)
    write_json(data / "SparklesDialogueVG/annotations/SparklesDialogueVG.json", [{"bad": 1}])


def test_sparkles_filters_tags_and_capitalises(tmp_path: Path) -> None:
    _sparkles_fixture(tmp_path)
    convs, ctx = load("sparkles_dialogue", tmp_path, seed=1)
    assert ctx.drops == {"odd_turns": 1, "too_many_images": 1, "missing_image": 1,
                         "bad_roles": 1, "malformed_record": 1}  # fmt: skip
    (conv,) = convs
    assert conv.id == "sparkles_dialogue:CC:d1"
    images = tmp_path / "SparklesDialogueCC/images"
    assert conv.images == [str(images / f"{i}.jpg") for i in (11, 111, 7)]
    style = next(s for s in SPARKLES_TAG_STYLES if f"{s[0]} and{s[1]}." in conv.messages[0].content)
    a, b, c = style[:3]
    cap = lambda s: s[0].upper() + s[1:]  # noqa: E731
    assert [m.content for m in conv.messages] == [
        f"<image>\n<image>\n compare {a} and{b}. Is the NASA logo there?",  # as the original
        f"In {b} the logo is visible. NASA made {a}. {cap(a)} shows none.",  # not "Nasa"
        f"<image>\nAnd {c}? Tell me.",
        f"{cap(c)} resembles {a}.",
    ]
    styles = {load("sparkles_dialogue", tmp_path, seed=s)[0][0].messages[1].content
              for s in range(12)}  # fmt: skip
    assert len(styles) > 1
