"""Sequence packing (`data.packing`): whole conversations fill rows of up to `model.max_seq_len`.

Plan: every epoch the sample indices are shuffled from (seed, epoch), cut into windows of
`PACK_WINDOW` samples, and each window is packed first-fit-decreasing (longest first, into the
first row with room); the rows of a window are then shuffled too, so a step does not see only
long or only short rows. The plan is a pure function of (lengths, seed, epoch, max_seq_len):
a resumed run rebuilds it and skips the rows already trained on (`SkipFirst`), exactly like
the unpacked sampler. Rows are dealt to ranks round-robin after dropping the remainder, so
every rank gets the same number of rows, and so the same number of steps.

Lengths are the encoded lengths (`SampleEncoder.encode`: template, image tokens, over-length
rounds dropped), computed in the main process from text alone (no image is decoded). A sample
the template refuses gets length 1 and a row slot; it comes back as `SkippedSample` from the
dataset and is counted like today (e.g. "too_long" with `data.overlength=drop`).

Collation (`PackedCollator`): a row concatenates its samples' ids, labels and images in order;
`sequence_ids` (1, 2, ... per conversation, 0 on pads) and `position_ids` (restarting at 0 per
conversation) go with it. The first label of every conversation is set to -100, so no target
crosses a boundary (the loss predicts labels[t + 1] from position t). The supervised tokens
are the same as unpacked, so the global token-mean loss is too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from dsvl_cli.data.collate import Batch, Collator
from dsvl_cli.data.conversation import Conversation
from dsvl_cli.data.encoder import Sample, SampleEncoder, SkippedSample
from dsvl_cli.data.template import IGNORE_INDEX, Skip

PACK_WINDOW = 2048  # samples packed together: large enough for near-optimal fill, small for memory

Row = tuple[int, ...]


def encoded_lengths(conversations: Sequence[Conversation], encoder: SampleEncoder) -> list[int]:
    """Token length of each conversation as the encoder renders it (1 for a refused sample)."""
    lengths = []
    for conv in conversations:
        tokens = encoder.tokens(conv)  # the token cache's entry when there is one
        lengths.append(1 if isinstance(tokens, Skip) else len(tokens[0]))
    return lengths


def first_fit_decreasing(
    indices: Sequence[int], lengths: Sequence[int], capacity: int
) -> list[list[int]]:
    """Pack `indices` into rows whose lengths sum to at most `capacity` (longer ones alone).

    Longest first (ties keep the given order), each into the first row with room. Returns the
    rows in creation order, each in placement order.
    """
    order = sorted(indices, key=lambda i: -min(lengths[i], capacity))
    rows: list[list[int]] = []
    room: list[int] = []
    for index in order:
        need = min(lengths[index], capacity)
        for r, free in enumerate(room):
            if need <= free:
                rows[r].append(index)
                room[r] -= need
                break
        else:
            rows.append([index])
            room.append(capacity - need)
    return rows


def pack_epoch(lengths: Sequence[int], capacity: int, seed: int, epoch: int) -> list[Row]:
    """Every row of one epoch's plan (see the module docstring), before sharding."""
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    rows: list[Row] = []
    for start in range(0, len(order), PACK_WINDOW):
        window = first_fit_decreasing(order[start : start + PACK_WINDOW], lengths, capacity)
        shuffled = torch.randperm(len(window), generator=generator).tolist()
        rows.extend(tuple(window[i]) for i in shuffled)
    return rows


class PackedRowSampler(Sampler[Row]):
    """This rank's packed rows of the epoch set by `set_epoch` (same count on every rank).

    Args:
        lengths: encoded length per sample (`encoded_lengths`).
        capacity: `model.max_seq_len`.
        seed: `data.seed`; rank, world_size: this process and how many there are.
    """

    def __init__(
        self, lengths: Sequence[int], capacity: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.lengths, self.capacity, self.seed = list(lengths), capacity, seed
        self.rank, self.world_size = rank, world_size
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        rows = pack_epoch(self.lengths, self.capacity, self.seed, epoch)
        usable = len(rows) - len(rows) % self.world_size
        self.rows = rows[self.rank : usable : self.world_size]

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


class PackedDataset(Dataset):
    """Row of indices -> the samples (or skips) of that row, from an index-based dataset."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, row: Row) -> list[Sample | SkippedSample]:
        return [self.dataset[i] for i in row]


def _row_tensors(samples: Sequence[Sample]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(input_ids, labels, sequence_ids, position_ids) [L_row] of one packed row."""
    labels = []
    for sample in samples:
        own = sample.labels.clone()
        own[0] = IGNORE_INDEX  # position -1 of this conversation is the previous one's last token
        labels.append(own)
    lengths = [s.input_ids.shape[0] for s in samples]
    sequence_ids = torch.repeat_interleave(torch.arange(1, len(samples) + 1), torch.tensor(lengths))
    positions = torch.cat([torch.arange(n) for n in lengths])
    return torch.cat([s.input_ids for s in samples]), torch.cat(labels), sequence_ids, positions


class PackedCollator(Collator):
    """Rows of samples -> one padded `Batch` with `sequence_ids` and `position_ids` (module doc)."""

    def __call__(self, rows: Sequence[Sequence[Sample | SkippedSample]]) -> Batch:  # type: ignore[override]
        kept = [[s for s in row if isinstance(s, Sample)] for row in rows]
        skipped = [(s.id, s.reason) for row in rows for s in row if isinstance(s, SkippedSample)]
        kept = [row for row in kept if row]
        if not kept:
            return Batch.empty(skipped)
        parts = [_row_tensors(row) for row in kept]
        input_ids = self._pad([p[0] for p in parts], self.pad_token_id)
        labels = self._pad([p[1] for p in parts], IGNORE_INDEX)
        sequence_ids = self._pad([p[2] for p in parts], 0)
        position_ids = self._pad([p[3] for p in parts], 0)
        samples = [s for row in kept for s in row]
        return Batch(
            input_ids=input_ids,
            labels=labels,
            attention_mask=(sequence_ids > 0).long(),
            pixel_values=torch.cat([s.pixel_values for s in samples]),
            num_images=torch.tensor([sum(s.num_images for s in row) for row in kept]),
            ids=[s.id for s in samples],
            skipped=skipped,
            sequence_ids=sequence_ids,
            position_ids=position_ids,
        )
