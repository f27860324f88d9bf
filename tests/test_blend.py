"""Blending: counts, per-epoch grouping under the image limit, a fixed eval split, the report."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections import Counter
from pathlib import Path

import pytest

from dsvl_cli.config import DataConfig
from dsvl_cli.data.blend import Blend, Split, blend_manifest, load_blend, merge, write_blend_report
from dsvl_cli.data.conversation import Conversation, Message, write_jsonl
from dsvl_cli.errors import DataError

MAX_IMAGES = 3


def _conv(source: str, i: int) -> Conversation:
    n = i % 3  # 0, 1 or 2 images
    return Conversation(
        messages=[
            Message("user", "<image>\n" * n + f"question {i}?"),
            Message("assistant", f"answer {i}"),
        ],
        images=[f"img/{source}-{i}-{k}.png" for k in range(n)],
        id=f"{source}-{i}",
        source=source,
        system=f"system of {source}-{i}",
    )


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "a.jsonl", [_conv("a", i) for i in range(60)])
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "b.jsonl", [_conv("b", i) for i in range(30)])
    write_jsonl(tmp_path / "held.jsonl", [_conv("h", i) for i in range(5)])
    return tmp_path


def _cfg(prepared: Path, **overrides: object) -> DataConfig:
    tree: dict = {
        "prepared_dir": str(prepared),
        "sources": {"a": {"samples": 50, "concat": 3}, "b": {"file": "sub/b.jsonl"}},
        "eval_fraction": 0.1,
        "seed": 7,
    }
    tree.update(overrides)
    return DataConfig.model_validate(tree)


def _members(split: Split) -> list[list[str]]:
    return [c.id.split("+") for c in split.conversations]


def _flat(split: Split) -> list[str]:
    return [m for group in _members(split) for m in group]


def test_counts_and_split(prepared: Path) -> None:
    blend = load_blend(_cfg(prepared), MAX_IMAGES)
    a, b = blend.pools
    assert (a.raw_count, a.used_count, len(a.train), len(a.eval)) == (60, 50, 45, 5)
    assert (b.raw_count, b.used_count, len(b.train), len(b.eval)) == (30, 30, 27, 3)
    assert len({c.id for c in a.train + a.eval}) == 50  # without replacement
    assert b.path == prepared / "sub" / "b.jsonl"


def test_groups_use_every_train_sample_once_within_limits(prepared: Path) -> None:
    blend = load_blend(_cfg(prepared), MAX_IMAGES)
    a, b = blend.pools
    for epoch in range(3):
        split = blend.train_split(epoch)
        assert Counter(_flat(split)) == Counter(c.id for c in a.train + b.train)
        sizes = [len(m) for m in _members(split)]
        assert all(1 <= s <= 3 for s in sizes) and max(sizes) > 1
        assert all(c.num_images <= MAX_IMAGES for c in split.conversations)
        b_groups = [m for m in _members(split) if m[0].startswith("b-")]
        assert all(len(m) == 1 for m in b_groups)  # b has concat 1
        assert all(len({x[0] for x in m}) == 1 for m in _members(split))  # never mixes sources
        assert split.counts == {"a": len(split) - 27, "b": 27}
        assert split.base_dirs[-1] == prepared / "sub" and split.base_dirs[0] == prepared


def test_image_limit_closes_groups_early(prepared: Path) -> None:
    blend = load_blend(_cfg(prepared, sources={"a": {"concat": 10}}), max_images=2)
    split = blend.train_split(0)
    assert all(c.num_images <= 2 for c in split.conversations)
    assert Counter(_flat(split)) == Counter(c.id for c in blend.pools[0].train)


def test_eval_is_disjoint_and_stable(prepared: Path) -> None:
    blend = load_blend(_cfg(prepared), MAX_IMAGES)
    eval_ids = _flat(blend.eval_split())
    assert sorted(eval_ids) == sorted(c.id for p in blend.pools for c in p.eval)
    for epoch in range(4):
        assert not set(eval_ids) & set(_flat(blend.train_split(epoch)))
    again = load_blend(_cfg(prepared), MAX_IMAGES)
    assert [c.id for c in again.eval_split().conversations] == [
        c.id for c in blend.eval_split().conversations
    ]


def test_groups_redrawn_per_epoch_and_deterministic(prepared: Path) -> None:
    first = load_blend(_cfg(prepared), MAX_IMAGES)
    second = load_blend(_cfg(prepared), MAX_IMAGES)
    ids = [[c.id for c in first.train_split(e).conversations] for e in range(2)]
    assert ids[0] != ids[1]
    assert [c.id for c in second.train_split(1).conversations] == ids[1]
    assert [c.id for c in first.train_split(0).conversations] == ids[0]
    other_seed = load_blend(_cfg(prepared, seed=8), MAX_IMAGES)
    assert [c.id for c in other_seed.train_split(0).conversations] != ids[0]


def test_eval_file_replaces_the_split(prepared: Path) -> None:
    blend = load_blend(_cfg(prepared, eval_file="held.jsonl", eval_fraction=0.5), MAX_IMAGES)
    assert [len(p.eval) for p in blend.pools] == [0, 0]
    assert [len(p.train) for p in blend.pools] == [50, 30]
    split = blend.eval_split()
    assert [c.id for c in split.conversations] == [f"h-{i}" for i in range(5)]
    assert split.base_dirs == [prepared] * 5
    assert split.counts == {"eval_file": 5, "a": 0, "b": 0}


def test_merge_concatenates_in_order() -> None:
    parts = [_conv("a", 1), _conv("a", 2), _conv("a", 3)]
    merged = merge(parts)
    merged.validate()
    assert merged.id == "a-1+a-2+a-3"
    assert merged.images == ["img/a-1-0.png", "img/a-2-0.png", "img/a-2-1.png"]
    assert [m.content for m in merged.messages[1::2]] == ["answer 1", "answer 2", "answer 3"]
    assert merged.system == "system of a-1" and merged.source == "a"
    assert merge(parts[:1]) is parts[0]


def test_report(prepared: Path, tmp_path: Path) -> None:
    blend = load_blend(_cfg(prepared), MAX_IMAGES)
    train = blend.train_split(2)
    path = tmp_path / "out" / "blend.json"
    write_blend_report(path, blend_manifest(blend, 2, train))
    report = json.loads(path.read_text())
    a = report["sources"]["a"]
    assert (a["raw"], a["samples"], a["used"], a["train"], a["eval"], a["concat"]) == (
        60,
        50,
        50,
        45,
        5,
        3,
    )
    assert a["train_groups"] == train.counts["a"] < 45
    assert a["file"] == str(prepared / "a.jsonl")
    assert report["sources"]["b"]["train_groups"] == 27
    assert (report["seed"], report["epoch"], report["max_images_per_sample"]) == (7, 2, 3)
    assert report["eval_items"] == len(blend.eval_split()) == len(report["eval_ids"])
    assert report["eval_file"] is None


def test_errors(prepared: Path) -> None:
    with pytest.raises(DataError, match="holds only 60"):
        load_blend(_cfg(prepared, sources={"a": {"samples": 61}}), MAX_IMAGES)
    with pytest.raises(DataError, match="data.sources.c: .*c.jsonl not found"):
        load_blend(_cfg(prepared, sources={"c": {}}), MAX_IMAGES)
    with pytest.raises(DataError, match="data.eval_file"):
        load_blend(_cfg(prepared, eval_file="nope.jsonl"), MAX_IMAGES)
    with pytest.raises(DataError, match="data.sources is empty"):
        load_blend(_cfg(prepared, sources={}), MAX_IMAGES)


def test_blend_is_plain_data(prepared: Path) -> None:
    blend = load_blend(_cfg(prepared), MAX_IMAGES)
    assert isinstance(blend, Blend) and blend.eval_split() is blend.eval_split()
