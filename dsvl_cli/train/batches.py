"""What the trainer feeds the engine: datasets and loaders of a split, and model inputs of a batch.

Training shards with `DistributedSampler(drop_last=True)` (no sample twice in an epoch).
Evaluation shards without padding (`EvalShard`: rank r takes samples r, r + W, r + 2W, ...), so a
sample is scored exactly once whatever the world size; ranks with fewer batches run zero-weight
placeholder forwards (`placeholder_inputs`) so that every rank runs the same collectives.
With `data.packing` a training micro-batch is `micro_batch_size` packed rows (`PackedRowSampler`,
`PackedCollator`); with `data.group_by_length` samples are batched by modality and length
(`LengthGroupedSampler`). Evaluation is never packed: it scores each sample on its own row.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dsvl_cli import dist
from dsvl_cli.config import Config
from dsvl_cli.data.collate import Batch, Collator
from dsvl_cli.data.dataset import PREFETCH_FACTOR, ConversationDataset, make_loader
from dsvl_cli.data.encoder import SampleEncoder
from dsvl_cli.data.grouping import LengthGroupedSampler
from dsvl_cli.data.packing import PackedCollator, PackedDataset, PackedRowSampler, encoded_lengths
from dsvl_cli.data.pixel_cache import PixelCache
from dsvl_cli.data.template import IGNORE_INDEX
from dsvl_cli.data.token_cache import TokenCache
from dsvl_cli.log import get_logger
from dsvl_cli.model.builder import Built

log = get_logger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class EvalShard(Sampler[int]):
    """Indices `rank, rank + world, ...` of `total`: uneven shares, never a repeated sample."""

    def __init__(self, total: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, total, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def dataset(
    config: Config,
    built: Built,
    split: Any,
    cache: PixelCache | None = None,
    tokens: TokenCache | None = None,
) -> ConversationDataset:
    """The tokenising, image-loading dataset of one blend split (the model's `SampleEncoder`)."""
    encoder = SampleEncoder.from_built(built, config)
    encoder = replace(encoder, pixel_cache=cache, token_cache=tokens)
    return ConversationDataset(split.conversations, split.base_dirs, encoder)


def token_cache(config: Config) -> TokenCache | None:
    """The run's cache of tokenised training and eval conversations (`data.token_cache_mb`).

    None when it is 0, and when it could never hit: with DataLoader workers (`data.workers` > 0:
    each worker fills its own copy and the workers are re-created per epoch and evaluation) or
    when a source groups conversations (`concat` > 1: merged conversations are new objects every
    epoch). Both are logged.
    """
    if not config.data.token_cache_mb:
        return None
    why = None
    if config.data.workers > 0:
        why = "data.workers > 0: each loader process would fill its own copy, never reused"
    elif any(spec.concat > 1 for spec in config.data.sources.values()):
        why = "a source groups samples (concat > 1): its merged conversations are new each epoch"
    if why is not None:
        log.warning("token cache (data.token_cache_mb) off: %s", why)
        return None
    return TokenCache(config.data.token_cache_mb)


def pixel_cache(config: Config, built: Built, *splits: Any) -> PixelCache | None:
    """The run's cache of processed images (`data.pixel_cache_mb`; None when 0).

    `splits`: any epoch's training split (every epoch reads the same images, only grouped
    differently), then the eval split (read at every evaluation); slots go in that order.
    """
    if not config.data.pixel_cache_mb or built.image_transform is None:
        return None
    keys = (
        (str(base), str(ref))
        for split in splits
        for conv, base in zip(split.conversations, split.base_dirs, strict=True)
        for ref in conv.images
    )
    shape = SampleEncoder.from_built(built, config).image_shape
    return PixelCache(keys, shape, config.data.pixel_cache_mb, shared=config.data.workers > 0)


def train_loader(
    config: Config,
    built: Built,
    split: Any,
    collator: Collator,
    cache: PixelCache | None = None,
    tokens: TokenCache | None = None,
) -> DataLoader:
    """This rank's shuffled, drop-last share of a training split (caches: see `pixel_cache`,
    `token_cache`).

    Packed (`data.packing`), its batches are rows of conversations and `collator`'s pad id is
    used by a `PackedCollator`.
    """
    data: Dataset = dataset(config, built, split, cache, tokens)
    sampler = train_sampler(config, data)
    if config.data.packing:
        data = PackedDataset(data)
        collator = PackedCollator(collator.pad_token_id, collator.pad_to_multiple_of)
    return make_loader(
        data,
        batch_size=config.train.micro_batch_size,
        collate_fn=collator,
        shuffle=True,
        seed=config.data.seed,
        workers=config.data.workers,
        drop_last=True,
        rank=dist.rank(),
        world_size=dist.world_size(),
        sampler=sampler,
    )


def train_sampler(config: Config, data: ConversationDataset) -> Sampler[Any] | None:
    """The packing or length-grouping sampler the config asks for; None: the default sampler.

    Both read every sample's encoded length (text only, no image decoded) in this process.
    """
    if not (config.data.packing or config.data.group_by_length):
        return None
    lengths = encoded_lengths(data.conversations, data.encoder)
    rank, world = dist.rank(), dist.world_size()
    if config.data.packing:
        return PackedRowSampler(lengths, config.model.max_seq_len, config.data.seed, rank, world)
    has_images = [bool(conv.images) for conv in data.conversations]
    batch = config.train.micro_batch_size
    return LengthGroupedSampler(lengths, has_images, batch, config.data.seed, rank, world)


def eval_loader(
    config: Config,
    built: Built,
    split: Any,
    collator: Collator,
    cache: PixelCache | None = None,
    tokens: TokenCache | None = None,
) -> DataLoader:
    """This rank's share of the eval split, in order, without padding duplicates."""
    data = dataset(config, built, split, cache, tokens)
    return DataLoader(
        data,
        batch_size=config.train.eval_batch_size,
        sampler=EvalShard(len(data), dist.rank(), dist.world_size()),
        collate_fn=collator,
        num_workers=config.data.workers,
        prefetch_factor=PREFETCH_FACTOR if config.data.workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
    )


def placeholder_inputs(built: Built, device: torch.device) -> dict[str, torch.Tensor]:
    """A one-token, unsupervised input: a zero-loss forward that keeps a rank in step."""
    ids = torch.tensor([[built.tokenizer.pad_token_id]], device=device)
    return {"input_ids": ids, "labels": torch.full_like(ids, IGNORE_INDEX)}


def model_inputs(
    batch: Batch, built: Built, device: torch.device, precision: str
) -> dict[str, torch.Tensor]:
    """Forward kwargs of a batch (pixels cast to the training dtype); a placeholder if empty."""
    if batch.is_empty:
        return placeholder_inputs(built, device)
    batch = batch.to(device)
    pixels = batch.pixel_values if batch.pixel_values.shape[0] > 0 else None
    inputs = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "labels": batch.labels,
        "pixel_values": None if pixels is None else pixels.to(DTYPES[precision]),
    }
    if batch.sequence_ids is not None:
        inputs["sequence_ids"] = batch.sequence_ids
        inputs["position_ids"] = batch.position_ids
    return inputs


def supervised_tokens(batch: Batch) -> int:
    """Positions whose next token is a training target."""
    return 0 if batch.is_empty else int((batch.labels[:, 1:] != IGNORE_INDEX).sum())


def input_tokens(batch: Batch) -> int:
    """Non-pad input tokens (for tokens/s)."""
    return 0 if batch.is_empty else int(batch.attention_mask.sum())
