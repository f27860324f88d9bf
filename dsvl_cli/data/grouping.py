"""Modality-length grouping (`data.group_by_length`): the cheap alternative to packing.

LLaVA's `group_by_modality_length`: image samples and text-only samples are batched apart, and
inside each modality samples of similar length share a micro-batch, so less of each micro-batch
is padding. Per epoch, from (seed, epoch): each modality's indices are shuffled, cut into
mega-batches of `MEGA_BATCHES` x world x micro-batch samples, each mega-batch sorted longest first
and cut into micro-batches; the leftovers of both modalities form mixed micro-batches; the
micro-batches are shuffled (so lengths do not decrease through the epoch) and dealt round-robin
to ranks after dropping the remainder, so every rank runs the same number of steps. The sampler
yields sample indices in micro-batch order; the DataLoader's `batch_size` cuts them back, and a
resumed run skips whole micro-batches (`SkipFirst`) exactly like the default sampler.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

MEGA_BATCHES = 50  # micro-batches per rank sorted together (transformers' `mega_batch_mult` cap)


def _batches_of(
    indices: list[int], lengths: Sequence[int], size: int, mega: int
) -> tuple[list[list[int]], list[int]]:
    """Full length-sorted micro-batches of `indices` (already shuffled), and the leftover."""
    batches: list[list[int]] = []
    for start in range(0, len(indices), mega):
        chunk = sorted(indices[start : start + mega], key=lambda i: -lengths[i])
        batches.extend(chunk[i : i + size] for i in range(0, len(chunk), size))
    if batches and len(batches[-1]) < size:
        return batches, batches.pop()
    return batches, []


def grouped_batches(
    lengths: Sequence[int],
    has_images: Sequence[bool],
    batch_size: int,
    world_size: int,
    seed: int,
    epoch: int,
) -> list[list[int]]:
    """Every micro-batch of one epoch's plan, in order, before dealing to ranks."""
    generator = torch.Generator().manual_seed(seed + epoch)
    mega = batch_size * world_size * MEGA_BATCHES
    batches, leftover = [], []
    for modality in (True, False):
        group = [i for i, image in enumerate(has_images) if image == modality]
        shuffled = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
        full, rest = _batches_of(shuffled, lengths, batch_size, mega)
        batches.extend(full)
        leftover.extend(rest)
    mixed, _ = _batches_of(leftover, lengths, batch_size, mega)
    batches.extend(mixed)
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


class LengthGroupedSampler(Sampler[int]):
    """This rank's sample indices, micro-batch by micro-batch (see the module docstring).

    Args:
        lengths: encoded length per sample; has_images: whether each sample has an image.
        batch_size: the micro-batch size the DataLoader uses with this sampler.
        seed: `data.seed`; rank, world_size: this process and how many there are.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        has_images: Sequence[bool],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(lengths) != len(has_images):
            raise ValueError(f"{len(lengths)} lengths for {len(has_images)} samples")
        self.lengths, self.has_images = list(lengths), list(has_images)
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        batches = grouped_batches(
            self.lengths, self.has_images, self.batch_size, self.world_size, self.seed, epoch
        )
        usable = len(batches) - len(batches) % self.world_size
        self.indices = [i for batch in batches[self.rank : usable : self.world_size] for i in batch]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
