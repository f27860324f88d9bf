"""Dataset, collator, skip accounting and loader: shapes, pads, image order, skips, samplers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dsvl_cli.data.collate import Batch, Collator
from dsvl_cli.data.conversation import Conversation, Message
from dsvl_cli.data.dataset import (
    ConversationDataset,
    Sample,
    SkipCounter,
    SkippedSample,
    make_loader,
    set_epoch,
)
from dsvl_cli.data.template import IGNORE_INDEX, Encoded, encode_conversation
from dsvl_cli.errors import DataError

N = 3  # tokens per image
SIZE = 16
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def transform(image: Image.Image) -> torch.Tensor:
    """Resize to 16 px and scale to 0..1, [3, H, W] (module level: picklable for workers)."""
    array = np.asarray(image.resize((SIZE, SIZE)), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>", "<unk>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(
        ["### Image 1:\n### Question:\nWhat colour?\n### Answer:\nRed."] * 3, trainer
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    return tok


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for name, rgb in COLOURS.items():
        Image.new("RGB", (24, 20), rgb).save(folder / f"{name}.png")
    return folder


def conv(cid: str, *turns: str, images: tuple[str, ...] = ()) -> Conversation:
    roles = ("user", "assistant")
    messages = [Message(roles[i % 2], t) for i, t in enumerate(turns)]  # type: ignore[arg-type]
    return Conversation(messages, images=list(images), id=cid, system="")


THREE = [
    conv("none", "What colour is the sky on a clear day?", "Blue."),
    conv("one", "<image>\nWhat colour?", "Red.", images=("red.png",)),
    conv("two", "<image><image>\nColours?", "Green and blue.", images=("green.png", "blue.png")),
]


def dataset(tok, image_dir, conversations=THREE, **kwargs) -> ConversationDataset:
    settings = {"max_seq_len": 512, "overlength": "drop", "max_images": 8}
    settings.update(kwargs)
    return ConversationDataset(
        conversations,
        image_dir,
        tokenizer=tok,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        tokens_per_image=N,
        image_transform=transform,
        image_size=SIZE,
        **settings,
    )


def colour_of(pixels: torch.Tensor) -> str:
    mean = tuple(round(float(v) * 255) for v in pixels.mean(dim=(1, 2)))
    return next(name for name, rgb in COLOURS.items() if rgb == mean)


def test_batch_of_zero_one_two_images(tok, image_dir) -> None:
    ds = dataset(tok, image_dir)
    items = [ds[i] for i in range(3)]
    assert all(isinstance(item, Sample) for item in items)
    batch = Collator(pad_token_id=tok.pad_token_id)(items)
    image_id = tok.convert_tokens_to_ids("<image>")
    lengths = [len(item.input_ids) for item in items]
    assert batch.input_ids.shape == batch.labels.shape == (3, max(lengths))
    for row, conversation in enumerate(THREE):
        ref = encode_conversation(conversation, tok, image_id, N, 512)
        assert isinstance(ref, Encoded)
        n = len(ref.input_ids)
        assert batch.input_ids[row, :n].tolist() == ref.input_ids
        assert batch.labels[row, :n].tolist() == ref.labels
        assert (batch.input_ids[row, n:] == tok.pad_token_id).all()
        assert (batch.labels[row, n:] == IGNORE_INDEX).all()
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch.input_ids[row] == image_id).sum() == N * ref.num_images
    assert batch.pixel_values.shape == (3, 3, SIZE, SIZE)
    assert batch.pixel_values.dtype == torch.float32
    assert [colour_of(p) for p in batch.pixel_values] == ["red", "green", "blue"]
    assert batch.num_images.tolist() == [0, 1, 2]
    assert batch.ids == ["none", "one", "two"] and batch.skipped == []
    assert items[0].pixel_values.shape == (0, 3, SIZE, SIZE)
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids) and moved.ids == batch.ids


def test_pad_to_multiple(tok, image_dir) -> None:
    ds = dataset(tok, image_dir)
    batch = Collator(tok.pad_token_id, pad_to_multiple_of=64)([ds[0], ds[2]])
    assert batch.input_ids.shape[1] == 64
    assert batch.attention_mask.sum().item() == len(ds[0].input_ids) + len(ds[2].input_ids)


def test_missing_image_and_overlength_become_skips(tok, image_dir) -> None:
    broken = conv("broken", "<image>\nWhat?", "Red.", images=("gone.png",))
    long = conv("long", "What colour? " * 40, "Red.")
    ds = dataset(tok, image_dir, [THREE[1], broken, long], max_seq_len=60)
    assert ds[1] == SkippedSample("broken", "image_missing", ds[1].detail)
    assert "gone.png" in ds[1].detail
    assert ds[2].reason == "too_long"
    batch = Collator(tok.pad_token_id)([ds[i] for i in range(3)])
    assert batch.ids == ["one"] and batch.num_images.tolist() == [1]
    assert batch.skipped == [("broken", "image_missing"), ("long", "too_long")]


def test_all_skipped_gives_an_empty_batch(tok, image_dir) -> None:
    broken = conv("broken", "<image>\nWhat?", "Red.", images=("gone.png",))
    batch = Collator(tok.pad_token_id)([dataset(tok, image_dir, [broken])[0]])
    assert batch.is_empty and batch.size == 0 and batch.input_ids.shape == (0, 0)
    assert batch.skipped == [("broken", "image_missing")]


def test_truncated_rounds_load_only_kept_images(tok, image_dir) -> None:
    two_rounds = conv("r", "What colour?", "Red.", "<image> And this?", "Blue.", images=("x.png",))
    ds = dataset(tok, image_dir, [two_rounds], max_seq_len=40, overlength="truncate_rounds")
    sample = ds[0]  # x.png does not exist: it belongs to the dropped round, so it is never read
    assert isinstance(sample, Sample)
    assert sample.num_images == 0 and sample.pixel_values.shape == (0, 3, SIZE, SIZE)


def test_construction_reads_nothing_and_pickles(tok, image_dir) -> None:
    ghost = [conv("g", "<image> hi", "x", images=("/does/not/exist.png",))]
    dataset(tok, Path("/does/not/exist"), ghost)  # no file I/O in __init__
    ds = pickle.loads(pickle.dumps(dataset(tok, image_dir)))
    assert ds[2].input_ids.tolist() == dataset(tok, image_dir)[2].input_ids.tolist()
    with pytest.raises(ValueError, match="base_dirs has 1 entries for 3"):
        dataset(tok, [image_dir], THREE)


def _batch(kept: int, skipped: list[tuple[str, str]]) -> Batch:
    ids = torch.zeros(kept, 4, dtype=torch.long)
    return Batch(ids, ids, ids, torch.zeros(0, 3, 1, 1), torch.zeros(kept), [""] * kept, skipped)


def test_skip_counter() -> None:
    counter = SkipCounter()
    counter.update(_batch(3, [("a", "too_long")]))
    counter.update(_batch(2, [("b", "image_missing"), ("c", "too_long")]))
    assert (counter.seen, counter.total) == (8, 3)
    assert counter.by_reason == {"too_long": 2, "image_missing": 1}
    assert counter.fraction() == pytest.approx(3 / 8) and counter.fraction(30) == 0.1
    counter.check(0.5, min_seen=0)
    counter.check(0.1, min_seen=100)  # too few seen to judge
    with pytest.raises(DataError, match=r"3 of 8 samples failed \(too_long: 2 \(ids a, c\)"):
        counter.check(0.1, min_seen=0)
    restored = SkipCounter()
    restored.load_state_dict(counter.state_dict())
    assert (restored.seen, restored.by_reason, restored.examples) == (
        8,
        counter.by_reason,
        counter.examples,
    )


def _loader(ds, **kwargs):
    settings = {"batch_size": 2, "shuffle": True, "seed": 3, "workers": 0, "drop_last": False}
    settings.update(kwargs)
    return make_loader(ds, collate_fn=Collator(0), **settings)


def test_distributed_sampler_partitions(tok, image_dir) -> None:
    ds = dataset(tok, image_dir, THREE * 4)
    shares = [list(_loader(ds, rank=r, world_size=2).sampler) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == 6
    assert sorted(shares[0] + shares[1]) == list(range(12))


def test_set_epoch_changes_order_and_skip_first(tok, image_dir) -> None:
    ds = dataset(tok, image_dir, THREE * 4)
    loader = _loader(ds, drop_last=True)
    set_epoch(loader, 0)
    epoch0 = list(loader.sampler)
    set_epoch(loader, 1)
    assert list(loader.sampler) != epoch0 and sorted(loader.sampler) == sorted(epoch0)
    set_epoch(loader, 0)
    assert list(loader.sampler) == epoch0
    full = [batch.input_ids for batch in loader]
    set_epoch(loader, 0, skip_batches=2)
    assert list(loader.sampler) == epoch0[4:] and len(loader) == len(full) - 2
    resumed = [batch.input_ids for batch in loader]
    assert all(torch.equal(a, b) for a, b in zip(resumed, full[2:], strict=True))
    set_epoch(loader, 1)
    assert len(list(loader.sampler)) == 12


def test_loader_rejects_too_little_data(tok, image_dir) -> None:
    with pytest.raises(DataError, match="fewer than one batch of 4"):
        _loader(dataset(tok, image_dir), batch_size=4, drop_last=True)


def test_workers_spawn(tok, image_dir) -> None:
    loader = _loader(dataset(tok, image_dir), workers=2, multiprocessing_context="spawn")
    set_epoch(loader, 0)
    batches = list(loader)
    assert sorted(i for b in batches for i in b.ids) == ["none", "one", "two"]
    assert sum(b.pixel_values.shape[0] for b in batches) == 3
