"""The tokenised-conversation cache (`data.token_cache_mb`): equal samples, bounded, skips still
reported every time, off with `concat` grouping, and no change to what a training run computes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from inference_helpers import make_export
from train_helpers import RECIPE, tiny_overrides

from dsvl_cli.config import load_config
from dsvl_cli.data.conversation import Conversation, Message
from dsvl_cli.data.encoder import Sample, SampleEncoder, SkippedSample
from dsvl_cli.data.token_cache import MB, TokenCache
from dsvl_cli.inference.loader import load_for_inference
from dsvl_cli.train import batches
from dsvl_cli.train.trainer import fit


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_export(tmp_path_factory.mktemp("token cache"))


@pytest.fixture(scope="module")
def encoder(shapes: Path) -> SampleEncoder:
    loaded = load_for_inference(shapes / "export", device="cpu", dtype="fp32")
    return SampleEncoder.from_built(loaded.built, loaded.config)


def conversation(answer: str, conv_id: str) -> Conversation:
    messages = [Message("user", "<image>\nWhat is it?"), Message("assistant", answer)]
    return Conversation(messages, ["images/000000.png"], id=conv_id)


def test_cached_samples_equal_fresh_ones_and_are_reused(
    encoder: SampleEncoder, shapes: Path
) -> None:
    cache: TokenCache = TokenCache(16)
    cached = replace(encoder, token_cache=cache)
    convs = [conversation("A red square.", "a"), conversation("A blue circle.", "b")]
    for _ in range(3):  # three epochs over the same conversation objects
        for conv in convs:
            got, fresh = cached.sample(conv, shapes), encoder.sample(conv, shapes)
            assert isinstance(got, Sample) and isinstance(fresh, Sample)
            assert torch.equal(got.input_ids, fresh.input_ids)
            assert torch.equal(got.labels, fresh.labels) and got.num_images == fresh.num_images
            assert torch.equal(got.pixel_values, fresh.pixel_values)
    assert (cache.hits, cache.misses, len(cache)) == (4, 2, 2)
    # An equal but distinct conversation object is encoded again (identity, not equality).
    cached.sample(conversation("A red square.", "a"), shapes)
    assert cache.misses == 3


def test_a_skipped_sample_is_reported_every_time(encoder: SampleEncoder, shapes: Path) -> None:
    cache: TokenCache = TokenCache(16)
    cached = replace(encoder, token_cache=cache, max_seq_len=8)  # every sample is too long
    conv = conversation("A red square.", "long")
    first, second = cached.sample(conv, shapes), cached.sample(conv, shapes)
    assert isinstance(first, SkippedSample) and isinstance(second, SkippedSample)
    assert first.reason == second.reason == "too_long" and cache.hits == 1


def test_the_bound_holds_and_conversations_past_it_are_encoded_each_time(
    encoder: SampleEncoder, shapes: Path
) -> None:
    cache: TokenCache = TokenCache(1)
    cache.used = MB - 10  # nearly full: the next entry does not fit
    cached = replace(encoder, token_cache=cache)
    conv = conversation("A red square.", "a")
    cached.sample(conv, shapes)
    cached.sample(conv, shapes)
    assert len(cache) == 0 and (cache.hits, cache.misses) == (0, 2) and cache.used == MB - 10


def test_no_cache_when_off_or_when_a_source_groups_samples(shapes: Path, tmp_path: Path) -> None:
    def config(*extra: str):
        return load_config(RECIPE, tiny_overrides(shapes, tmp_path, *extra))

    assert batches.token_cache(config("data.token_cache_mb=0")) is None
    assert isinstance(batches.token_cache(config("data.token_cache_mb=8")), TokenCache)
    grouped = config("data.token_cache_mb=8", "data.sources.synthetic.concat=2")
    assert batches.token_cache(grouped) is None  # merged conversations are new every epoch
    workers = config("data.token_cache_mb=8", "data.workers=1")
    assert batches.token_cache(workers) is None  # each worker's copy would die unused


@pytest.mark.parametrize("grouping", [[], ["data.group_by_length=true"]], ids=["plain", "grouped"])
def test_training_with_the_cache_computes_the_same_losses(
    shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, grouping: list[str]
) -> None:
    encoded = {"count": 0}
    original = SampleEncoder.encode

    def counting(self: SampleEncoder, conv: Conversation):  # noqa: ANN202
        encoded["count"] += 1
        return original(self, conv)

    monkeypatch.setattr(SampleEncoder, "encode", counting)

    def run(name: str, *extra: str) -> tuple[list[float], float | None, int]:
        encoded["count"] = 0
        overrides = tiny_overrides(shapes, tmp_path / name, "data.workers=0", *grouping, *extra)
        overrides += ["train.epochs=3", "data.eval_file=eval.jsonl"]
        result = fit(load_config(RECIPE, overrides))
        return result.losses, result.eval_loss, encoded["count"]

    plain, plain_eval, plain_count = run("plain", "data.token_cache_mb=0")
    cached, cached_eval, cached_count = run("cached", "data.token_cache_mb=8")
    assert plain == cached and len(plain) == 6 and plain_eval == cached_eval  # 2 steps x 3
    # Training and eval conversations are encoded once each per run (lengths included), instead
    # of once per pass.
    conversations = sum(
        len((shapes / name).read_text().splitlines()) for name in ("train.jsonl", "eval.jsonl")
    )
    assert cached_count == conversations < plain_count
