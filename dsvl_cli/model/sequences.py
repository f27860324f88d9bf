"""Packed rows: per-token sequence ids (1, 2, ... per conversation, 0 on pads) to positions.

Conversations are contiguous runs of one id along a row; these helpers are vectorised (no loop
over tokens) and shared by the MMCA masks and the model's position ids.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sequence_starts(sequence_ids: Tensor) -> Tensor:
    """LongTensor [B, L]: index of the first position of each position's (contiguous) sequence."""
    pos = torch.arange(sequence_ids.shape[-1], device=sequence_ids.device).expand_as(sequence_ids)
    is_start = torch.ones_like(sequence_ids, dtype=torch.bool)
    is_start[:, 1:] = sequence_ids[:, 1:] != sequence_ids[:, :-1]
    return torch.where(is_start, pos, 0).cummax(dim=-1).values


def sequence_positions(sequence_ids: Tensor) -> Tensor:
    """LongTensor [B, L]: position ids restarting at 0 for every sequence of a packed row."""
    pos = torch.arange(sequence_ids.shape[-1], device=sequence_ids.device)
    return pos - sequence_starts(sequence_ids)
