"""The training Dataset over prepared conversations, its DataLoader, and skip accounting.

`ConversationDataset` holds conversations and the model's `SampleEncoder` only: constructing it
reads no file and tokenises nothing. `__getitem__` is `SampleEncoder.sample`: it encodes one
conversation with the DSVL template and loads and transforms only the images of the rounds it
kept. It never raises on bad data: a sample the template refuses, or one whose image fails to
load, comes back as `SkippedSample(id, reason)`, so a DataLoader worker never dies on one bad
file. The collator drops these markers into
`Batch.skipped`, and the trainer feeds every batch to a `SkipCounter` in the main process, which
raises once failures exceed `data.max_failure_fraction`.

Reasons: the template's ("empty", "invalid", "too_many_images", "too_long") and, for images,
"image_" + the `images.py` or `image_refs.py` reason ("image_missing", "image_truncated", ...).

Loading: `make_loader` builds a DataLoader over a `DistributedSampler` (also for one process)
wrapped in `SkipFirst`. Call `set_epoch(loader, epoch)` before every epoch: the order then changes
per epoch, reproducibly from (seed, epoch) (the original never did, §8.2 bug 7). Resuming in the
middle of an epoch: `set_epoch(loader, epoch, skip_batches=K)` makes the next pass start at batch
K of that epoch's order, and the skipped indices are never handed to a worker, so their images
are not decoded. The sampler runs in the main process, so this also works with persistent workers.

Per-epoch use with a blend whose groups change every epoch (blend.py): workers hold their copy of
the dataset, so each epoch builds `ConversationDataset(split.conversations, split.base_dirs,
encoder)` and a new loader from `blend.train_split(epoch)`, then calls `set_epoch` on it. The
fixed eval dataset keeps one loader, whose persistent workers survive between evaluations.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from dsvl_cli.data.conversation import Conversation
from dsvl_cli.data.encoder import Sample, SampleEncoder, SkippedSample
from dsvl_cli.errors import DataError

if TYPE_CHECKING:
    from dsvl_cli.data.collate import Batch

MAX_EXAMPLE_IDS = 5  # sample ids kept per skip reason, for error messages
# Batches each worker prepares ahead (torch's default is 2): image decoding is bursty (a
# MIMIC-IT group has 8 images), so a deeper queue keeps a step from waiting on one slow batch.
PREFETCH_FACTOR = 4


class ConversationDataset(Dataset):
    """Map-style dataset: index -> `Sample` or `SkippedSample` (see the module docstring).

    Args:
        conversations: the samples (e.g. `Split.conversations` from blend.py).
        base_dirs: the folder relative image paths start from, one per conversation, or one
            folder for all.
        encoder: the model's `SampleEncoder` (tokenizer, image tokens, limits, transform).
        **encoder_settings: without `encoder`, the `SampleEncoder` fields to build one from
            (tokenizer, image_token_id, tokens_per_image, image_transform, image_size,
            max_seq_len, overlength, max_images, max_round_tokens).

    Raises:
        ValueError: `base_dirs` does not match `conversations`; TypeError: both `encoder` and
            `encoder_settings`.
    """

    def __init__(
        self,
        conversations: Sequence[Conversation],
        base_dirs: Sequence[Path] | Path | str,
        encoder: SampleEncoder | None = None,
        **encoder_settings: Any,
    ) -> None:
        self.conversations = conversations
        if isinstance(base_dirs, (str, Path)):
            base_dirs = [Path(base_dirs)] * len(conversations)
        if len(base_dirs) != len(conversations):
            raise ValueError(
                f"base_dirs has {len(base_dirs)} entries for {len(conversations)} conversations"
            )
        self.base_dirs = base_dirs
        if encoder is not None and encoder_settings:
            raise TypeError("pass either a SampleEncoder or its settings, not both")
        self.encoder = encoder or SampleEncoder(**encoder_settings)

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> Sample | SkippedSample:
        return self.encoder.sample(self.conversations[index], Path(self.base_dirs[index]))


class SkipCounter:
    """Counts skipped samples from `Batch.skipped` in the main process and enforces the limit.

    `seen` counts every sample that reached a batch, kept or skipped. Keep one counter per run
    (save `state_dict()` with resume state); under several ranks each counts its own share.
    """

    def __init__(self) -> None:
        self.seen = 0
        self.by_reason: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def update(self, batch: Batch) -> None:
        self.seen += batch.size + len(batch.skipped)
        for sample_id, reason in batch.skipped:
            self.by_reason[reason] += 1
            ids = self.examples.setdefault(reason, [])
            if len(ids) < MAX_EXAMPLE_IDS:
                ids.append(sample_id)

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def fraction(self, seen: int | None = None) -> float:
        """Skipped / seen (`seen` defaults to the samples counted so far); 0 before any."""
        seen = self.seen if seen is None else seen
        return self.total / seen if seen else 0.0

    def summary(self) -> str:
        """E.g. "too_long: 3 (ids a, b, c), image_missing: 1 (ids d)"."""
        return ", ".join(
            f"{reason}: {n} (ids {', '.join(self.examples.get(reason, []))})"
            for reason, n in self.by_reason.most_common()
        )

    def check(self, max_failure_fraction: float, min_seen: int = 100) -> None:
        """Raise DataError if the skipped fraction exceeds the limit.

        Nothing is judged before `min_seen` samples (a few early failures are noise); call it
        with `min_seen=0` at the end of an epoch to judge small datasets too.
        """
        if self.seen < min_seen or self.fraction() <= max_failure_fraction:
            return
        raise DataError(
            f"{self.total} of {self.seen} samples failed ({self.summary()}) — over "
            f"data.max_failure_fraction={max_failure_fraction}; fix the data (`dsvl prepare-data` "
            "reports bad images) or raise the limit"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "by_reason": dict(self.by_reason), "examples": self.examples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = int(state["seen"])
        self.by_reason = Counter({str(k): int(v) for k, v in state["by_reason"].items()})
        self.examples = {str(k): list(v) for k, v in state["examples"].items()}


class SkipFirst(Sampler[int]):
    """Yields the wrapped sampler's indices after dropping the first `skip` of them.

    Used to resume mid-epoch without decoding the samples already trained on; `skip` applies
    to every pass until changed (`set_epoch` resets it).
    """

    def __init__(self, sampler: Sampler[int], skip: int = 0) -> None:
        if skip < 0:
            raise ValueError(f"skip must be >= 0, got {skip}")
        self.sampler = sampler
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        set_inner = getattr(self.sampler, "set_epoch", None)
        if set_inner is not None:
            set_inner(epoch)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    collate_fn: Callable[[list[Any]], Any],
    shuffle: bool,
    seed: int,
    workers: int,
    drop_last: bool,
    rank: int = 0,
    world_size: int = 1,
    multiprocessing_context: str | None = None,
    sampler: Sampler[Any] | None = None,
) -> DataLoader:
    """A DataLoader over this rank's share: `DistributedSampler` inside `SkipFirst`.

    `sampler` replaces the `DistributedSampler` (it must shard by itself and have `set_epoch`:
    `LengthGroupedSampler`, `PackedRowSampler`). Workers decode images off the training thread,
    `PREFETCH_FACTOR` batches ahead each; batches are pinned when CUDA is available.
    `drop_last` applies to both the sampler (no padding duplicates across ranks) and the last
    short batch. With `drop_last=False` (eval) the sampler repeats up to world_size - 1 samples
    so every rank runs the same number of batches, as ZeRO-3 requires.

    Raises:
        DataError: the dataset is empty, or `drop_last` leaves no batch on a rank.
    """
    total = len(dataset)  # type: ignore[arg-type]
    if total == 0:
        raise DataError("no samples to load; check data.sources and the prepared files")
    if sampler is None:
        sampler = DistributedSampler(
            dataset,
            num_replicas=world_size,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
    if drop_last and len(sampler) < batch_size:
        raise DataError(
            f"{total} samples give {len(sampler)} samples (or packed rows) per rank over "
            f"{world_size} rank(s), "
            f"fewer than one batch of {batch_size}; use more data or a smaller batch size"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=SkipFirst(sampler),
        collate_fn=collate_fn,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=PREFETCH_FACTOR if workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        multiprocessing_context=multiprocessing_context if workers > 0 else None,
    )


def set_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Prepare `loader` (from `make_loader`) for `epoch`; start at batch `skip_batches` of it."""
    sampler = loader.sampler
    if not isinstance(sampler, SkipFirst):
        raise TypeError("set_epoch needs a loader built by make_loader")
    sampler.set_epoch(epoch)
    sampler.skip = skip_batches * int(loader.batch_size or 1)
