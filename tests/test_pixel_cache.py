"""The processed-pixel cache (`data.pixel_cache_mb`): bounded, never caches a failure, starts
empty in every DataLoader worker, and changes nothing a training run computes."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from inference_helpers import make_export
from torch.utils.data import DataLoader
from train_helpers import RECIPE, tiny_overrides

from dsvl_cli.config import load_config
from dsvl_cli.data.conversation import Conversation, Message
from dsvl_cli.data.dataset import ConversationDataset
from dsvl_cli.data.encoder import SampleEncoder, SkippedSample
from dsvl_cli.data.pixel_cache import MB, PixelCache
from dsvl_cli.inference.loader import load_for_inference
from dsvl_cli.train.trainer import fit

IMAGES = ["images/000000.png", "images/000001.png", "images/000002.png"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_export(tmp_path_factory.mktemp("pixel cache"))


@pytest.fixture(scope="module")
def encoder(shapes: Path) -> SampleEncoder:
    loaded = load_for_inference(shapes / "export", device="cpu", dtype="fp32")
    return SampleEncoder.from_built(loaded.built, loaded.config)


def keys(shapes: Path, refs: list[str]) -> list[tuple[str, str]]:
    return [(str(shapes), ref) for ref in refs]


def test_cached_pixels_equal_fresh_ones_and_are_reused(encoder: SampleEncoder, shapes: Path):
    cache = PixelCache(keys(shapes, IMAGES + IMAGES), encoder.image_shape, 16, shared=False)
    cached = replace(encoder, pixel_cache=cache)
    first = cached.pixels(IMAGES, shapes)
    assert torch.equal(first, encoder.pixels(IMAGES, shapes))
    assert (cache.hits, cache.misses, len(cache)) == (0, 3, 3)
    again = cached.pixels(IMAGES[::-1], shapes)
    assert torch.equal(again, first.flip(0)) and (cache.hits, cache.misses) == (3, 3)
    assert cache.pixels.shape == (3, *encoder.image_shape)  # one slot per distinct image


def test_the_bound_holds_and_images_past_it_are_processed_each_time(
    encoder: SampleEncoder, shapes: Path, caplog: pytest.LogCaptureFixture
) -> None:
    per_image = 4 * math.prod(encoder.image_shape)
    room = MB // per_image  # 1 MiB: 85 images of 3 x 32 x 32
    refs = [IMAGES[0], *(f"images/other{i}.png" for i in range(room)), *IMAGES[1:]]
    with caplog.at_level("INFO", logger="dsvl_cli"):
        cache = PixelCache(keys(shapes, refs), encoder.image_shape, 1, shared=False)
    assert cache.pixels.shape[0] == room and cache.pixels.nbytes <= MB
    assert any(f"{room} of {room + 3} images" in r.getMessage() for r in caplog.records)
    cached = replace(encoder, pixel_cache=cache)
    first = cached.pixels(IMAGES, shapes)
    second = cached.pixels(IMAGES, shapes)
    assert torch.equal(first, second) and len(cache) == 1  # only the first image has a slot
    assert (cache.hits, cache.misses) == (1, 5)  # the other two are read both times


def test_a_failing_image_is_never_cached(encoder: SampleEncoder, tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "bad.png").write_bytes(b"not a png")
    ref = "images/bad.png"
    cache = PixelCache([(str(tmp_path), ref)], encoder.image_shape, 16, shared=False)
    cached = replace(encoder, pixel_cache=cache)
    conv = Conversation(
        [Message("user", "<image>\nWhat is it?"), Message("assistant", "A shape.")],
        [ref],
        id="bad",
    )
    for _ in range(2):  # counted as a skip every epoch, never served from the cache
        assert isinstance(cached.sample(conv, tmp_path), SkippedSample)
    assert len(cache) == 0 and cache.misses == 2


def test_shared_slots_are_filled_by_workers_and_read_by_all(
    encoder: SampleEncoder, shapes: Path
) -> None:
    cache = PixelCache(keys(shapes, IMAGES), encoder.image_shape, 16, shared=True)
    assert cache.pixels.is_shared() and cache.filled.is_shared()
    dataset = ConversationDataset(
        [
            Conversation([Message("user", "<image>\nQ?"), Message("assistant", "A.")], [r], id=r)
            for r in IMAGES
        ],
        [shapes] * 3,
        replace(encoder, pixel_cache=cache),
    )
    loader = DataLoader(dataset, batch_size=None, num_workers=2, collate_fn=lambda s: s)
    from_workers = [s.pixel_values for s in loader]
    assert len(cache) == 3  # the workers wrote into the parent's memory
    for slot, pixels in enumerate(from_workers):
        assert torch.equal(cache.pixels[slot], pixels[0])


def test_training_with_the_cache_computes_the_same_losses(
    shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    processed = {"count": 0}
    original = SampleEncoder._pixels_of

    def counting(self: SampleEncoder, *args: object) -> torch.Tensor:
        processed["count"] += 1
        return original(self, *args)

    monkeypatch.setattr(SampleEncoder, "_pixels_of", counting)

    def run(name: str, *extra: str) -> tuple[list[float], int]:
        processed["count"] = 0
        overrides = tiny_overrides(shapes, tmp_path / name, "data.workers=0", *extra)
        overrides += ["train.epochs=3", "data.eval_file=null", "data.eval_fraction=0"]
        return fit(load_config(RECIPE, overrides)).losses, processed["count"]

    plain, plain_reads = run("plain", "data.pixel_cache_mb=0")  # the tiny recipe caches
    cached, cached_reads = run("cached", "data.pixel_cache_mb=64")
    assert plain == cached and len(plain) == 6  # 2 steps x 3 epochs
    assert cached_reads > 0 and 3 * cached_reads == plain_reads  # each image processed once
