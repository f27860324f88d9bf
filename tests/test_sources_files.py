"""Source adapters, part 3: user-given files in LLaVA format (`llava_json`) and OpenAI-style
`messages` JSONL, with image lists, arbitrary rounds, typed content parts and drop reasons."""

from __future__ import annotations

import base64
import io
import json
import os
import random
from pathlib import Path
from typing import Any

from PIL import Image

from dsvl_cli.data.sources import SourceContext, get_source

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_ctx(data: Path, **kwargs: Any) -> SourceContext:
    out = data.parent / "prepared" / "images"
    return SourceContext(data_path=data, image_out=out, rng=random.Random(0), **kwargs)


def load(name: str, data: Path, **kwargs: Any) -> tuple[list, SourceContext]:
    ctx = make_ctx(data, **kwargs)
    source = get_source(name)
    assert source.check(ctx) == []
    return list(source.load(ctx)), ctx


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def contents(conv) -> list[str]:
    return [m.content for m in conv.messages]


def _turns(*values: str) -> list[dict[str, str]]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


# --- llava_json ----------------------------------------------------------------------------------


def _llava_records() -> list[dict[str, Any]]:
    return [
        {"id": "multi", "image": ["x/a.png", "/abs/b.png"],
         "conversations": _turns("Look at <image>\n and tell me.", "OK.", "Now\n<image>", "Done.",
                                 "Which was first?", "The first.")},
        {"id": "text", "conversations": _turns("Hi there\nfriend", "Hello.")},
        {"id": "implicit", "image": "c.png", "conversations": _turns("Describe.", "Red.")},
        {"id": "sys", "image": "d.png", "conversations": [
            {"from": "system", "value": "Be brief."}, *_turns("<image>\nWhat?", "A square.")]},
        {"id": "mismatch", "image": ["a.png"], "conversations": _turns("<image><image>", "?")},
        {"id": "odd", "conversations": _turns("One", "Two", "Three")},
        {"id": "remote", "image": "https://example.com/a.png",
         "conversations": _turns("<image>", "x")},
        {"id": "roles", "conversations": [{"from": "gpt", "value": "x"}]},
        {"id": "empty", "conversations": _turns("Question?", "  ")},
    ]  # fmt: skip


def test_llava_json_list_with_image_lists_and_rounds(tmp_path: Path) -> None:
    ann = tmp_path / "data/train.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps(_llava_records()), encoding="utf-8")
    convs, ctx = load("llava_json", ann)
    assert [c.id for c in convs] == [
        "llava_json:train:multi",
        "llava_json:train:text",
        "llava_json:train:implicit",
        "llava_json:train:sys",
    ]
    multi, text, implicit, sys_ = convs
    assert multi.images == [str(ann.parent / "x/a.png"), "/abs/b.png"]
    assert contents(multi) == [
        "<image>\nLook at \n and tell me.",  # placeholder moved to the front, text kept
        "OK.",
        "<image>\nNow",
        "Done.",
        "Which was first?",
        "The first.",
    ]
    assert text.images == [] and contents(text) == ["Hi there\nfriend", "Hello."]
    assert contents(implicit) == ["<image>\nDescribe.", "Red."]
    assert sys_.system == "Be brief." and contents(sys_) == ["<image>\nWhat?", "A square."]
    assert ctx.drops == {"placeholder_mismatch": 1, "odd_turns": 1, "remote_image": 1,
                         "malformed_record": 1, "empty_answer": 1}  # fmt: skip


def test_llava_json_jsonl_with_image_root_and_bad_line(tmp_path: Path) -> None:
    ann = write_jsonl(tmp_path / "anns/part.jsonl", [
        {"image": "a.png", "conversations": _turns("<image>\nQ?", "A.")},
        "{not json",
    ])  # fmt: skip
    images = tmp_path / "pics"
    convs, ctx = load("llava_json", tmp_path, files=[ann], image_root=images)
    assert [c.id for c in convs] == ["llava_json:part:0"]
    assert convs[0].images == [str(images / "a.png")]
    assert ctx.drops == {"malformed_record": 1}
    assert ctx.drop_examples["malformed_record"] == [f"{ann}:2"]


def test_file_sources_check_their_inputs(tmp_path: Path) -> None:
    for name in ("llava_json", "messages"):
        source = get_source(name)
        (problem,) = source.check(make_ctx(tmp_path))
        assert "is a folder" in problem
        (problem,) = source.check(make_ctx(tmp_path / "nope.json"))
        assert "not found" in problem


# --- messages ------------------------------------------------------------------------------------


def _png_data_uri() -> tuple[str, bytes]:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (0, 255, 0)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), buf.getvalue()


def _messages_records(uri: str) -> list[dict[str, Any]]:
    return [
        {"id": "typed", "messages": [
            {"role": "system", "content": "You compare pictures."},
            {"role": "user", "content": [
                {"type": "text", "text": "Compare"},
                {"type": "image", "image": "a.png"},
                {"type": "image_url", "image_url": {"url": "file:///abs/b.png"}},
                {"type": "text", "text": "please."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "They differ."}]},
            {"role": "user", "content": [{"type": "image_url", "image_url": uri},
                                         {"type": "text", "text": "And this?"}]},
            {"role": "assistant", "content": "Green."}]},
        {"id": "swift", "images": ["s1.png", "s2.png"], "messages": [
            {"role": "user", "content": "<image><image>Both?"},
            {"role": "assistant", "content": "Yes."}]},
        {"messages": [{"role": "user", "content": "Text only."},
                      {"role": "assistant", "content": "Fine."}]},
        {"id": "remote", "messages": [
            {"role": "user", "content": [{"type": "image_url",
                                          "image_url": {"url": "https://x.org/a.png"}}]},
            {"role": "assistant", "content": "?"}]},
        {"id": "bot-image", "messages": [
            {"role": "user", "content": "Draw."},
            {"role": "assistant", "content": [{"type": "image", "image": "c.png"}]}]},
        {"id": "roles", "messages": [{"role": "assistant", "content": "a"},
                                     {"role": "user", "content": "b"}]},
        {"id": "open", "messages": [{"role": "user", "content": "unanswered"}]},
        {"id": "spare", "images": ["x.png"], "messages": [
            {"role": "user", "content": "no placeholder"}, {"role": "assistant", "content": "a"}]},
        {"id": "audio", "messages": [
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
            {"role": "assistant", "content": "a"}]},
    ]  # fmt: skip


def test_messages_typed_parts_system_and_drops(tmp_path: Path) -> None:
    uri, png = _png_data_uri()
    path = write_jsonl(tmp_path / "chat.jsonl", _messages_records(uri))
    convs, ctx = load("messages", path)
    ids = ["messages:typed", "messages:swift", "messages:chat:2", "messages:spare"]
    assert [c.id for c in convs] == ids
    typed, swift, plain, spare = convs
    assert typed.system == "You compare pictures."
    assert contents(typed) == [
        "<image>\n<image>\nCompare\nplease.",
        "They differ.",
        "<image>\nAnd this?",
        "Green.",
    ]
    written = typed.images[2]
    assert typed.images[:2] == [str(tmp_path / "a.png"), "/abs/b.png"]
    assert written.startswith("images/messages/") and written.endswith(".png")
    assert (ctx.image_out.parent / written).read_bytes() == png
    assert swift.images == [str(tmp_path / "s1.png"), str(tmp_path / "s2.png")]
    assert contents(swift) == ["<image>\n<image>\nBoth?", "Yes."]
    assert plain.images == [] and plain.system is None
    # No <image> in any text: the top-level images open the first user turn, as in llava_json.
    assert contents(spare) == ["<image>\nno placeholder", "a"]
    assert spare.images == [str(tmp_path / "x.png")]
    assert ctx.drops == {"remote_image": 1, "assistant_image": 1, "bad_roles": 1, "odd_turns": 1,
                         "unsupported_content": 1}  # fmt: skip
