"""The collator: dataset items -> one padded `Batch` (runs inside DataLoader workers).

Padding is to the longest sample in the batch (optionally rounded up to a multiple, for kernels
that like aligned lengths), on the right: `input_ids` with the pad id, `labels` with -100,
`attention_mask` 0. Images of all samples are concatenated in sample order into one
`pixel_values [N, 3, H, W]`, and `num_images [B]` says how many belong to each row, so the model
can scatter features row by row in placeholder order.

Skipped samples (`SkippedSample`: the template refused the sample or an image failed to load)
are dropped here and listed in `Batch.skipped`, so the main process counts them (`SkipCounter`)
whatever worker produced them. If every sample of a batch was skipped the collator returns an
empty batch: `batch.is_empty` (B == 0; all tensors have zero rows, `pixel_values` is
`[0, 3, 0, 0]`). The trainer must still count its skips, and with several ranks it must keep the
ranks in step (e.g. run it as a zero-loss step), because the other ranks' steps all-reduce.

Packing (several conversations per row, `data.packing`) is `packing.PackedCollator`: it fills
`sequence_ids` and `position_ids` too, and `ids` then lists every sample of every row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from dsvl_cli.data.encoder import Sample, SkippedSample
from dsvl_cli.data.template import IGNORE_INDEX


@dataclass
class Batch:
    """A padded micro-batch.

    Attributes:
        input_ids: [B, L] token ids, right-padded with the pad id.
        labels: [B, L] targets, IGNORE_INDEX (-100) on prompts and pads.
        attention_mask: [B, L] 1 for real tokens, 0 for pads.
        pixel_values: [N, 3, H, W] every image of the batch, in sample order (N = sum of
            num_images).
        num_images: [B] images per row.
        ids: the sample ids (B unpacked; every conversation of every row when packed).
        skipped: (id, reason) of each sample dropped from this batch.
        sequence_ids: packed only, [B, L]: 1, 2, ... per conversation of a row, 0 on pads.
        position_ids: packed only, [B, L]: positions restarting at 0 for each conversation.
    """

    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor
    pixel_values: Tensor
    num_images: Tensor
    ids: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    sequence_ids: Tensor | None = None
    position_ids: Tensor | None = None

    @property
    def size(self) -> int:
        """The number of samples (0 for an all-skipped batch); B unless packed."""
        return len(self.ids) if self.sequence_ids is not None else int(self.input_ids.shape[0])

    @property
    def is_empty(self) -> bool:
        return self.size == 0

    @classmethod
    def empty(cls, skipped: list[tuple[str, str]]) -> Batch:
        """The batch returned when every sample was skipped."""
        no_tokens = torch.zeros(0, 0, dtype=torch.long)
        return cls(
            input_ids=no_tokens,
            labels=no_tokens.clone(),
            attention_mask=no_tokens.clone(),
            pixel_values=torch.zeros(0, 3, 0, 0),
            num_images=torch.zeros(0, dtype=torch.long),
            skipped=skipped,
        )

    def _map_tensors(self, fn: Callable[[Tensor], Tensor]) -> Batch:
        changes = {
            f.name: fn(getattr(self, f.name))
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, **changes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on `device` (lists stay as they are)."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Pinned copy; the DataLoader calls this when `pin_memory=True`."""
        return self._map_tensors(lambda t: t.pin_memory())


class Collator:
    """Pads `Sample`s into a `Batch` and lists `SkippedSample`s in `Batch.skipped`.

    Args:
        pad_token_id: id used for padding `input_ids` (the tokenizer's pad id, or its EOS id);
            never the image token id, or pads would read as image positions.
        pad_to_multiple_of: round the padded length up to a multiple of this (None: no rounding).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def _pad(self, rows: list[Tensor], value: int) -> Tensor:
        padded = pad_sequence(rows, batch_first=True, padding_value=value)
        if self.pad_to_multiple_of is not None:
            extra = -padded.shape[1] % self.pad_to_multiple_of
            padded = F.pad(padded, (0, extra), value=value)
        return padded

    def __call__(self, items: Sequence[Sample | SkippedSample]) -> Batch:
        samples = [item for item in items if isinstance(item, Sample)]
        skipped = [(item.id, item.reason) for item in items if isinstance(item, SkippedSample)]
        if len(samples) + len(skipped) != len(items):
            kinds = sorted({type(item).__name__ for item in items})
            raise TypeError(f"Collator takes Sample or SkippedSample items, got {kinds}")
        if not samples:
            return Batch.empty(skipped)
        input_ids = self._pad([s.input_ids for s in samples], self.pad_token_id)
        labels = self._pad([s.labels for s in samples], IGNORE_INDEX)
        lengths = torch.tensor([s.input_ids.shape[0] for s in samples])
        positions = torch.arange(input_ids.shape[1])
        attention_mask = (positions.unsqueeze(0) < lengths.unsqueeze(1)).long()
        return Batch(
            input_ids=input_ids,
            labels=labels,
            attention_mask=attention_mask,
            pixel_values=torch.cat([s.pixel_values for s in samples]),
            num_images=torch.tensor([s.num_images for s in samples], dtype=torch.long),
            ids=[s.id for s in samples],
            skipped=skipped,
        )
