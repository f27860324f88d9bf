"""A chat round's records: the finished `Round`, the `Reply` to a question, the next round's plan.

Kept apart from `session.py` (which re-exports them) so the session stays one screenful of logic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dsvl_cli.errors import DataError


class ContextOverflow(DataError):
    """The next round does not fit; `detail` without the chat advice (eval gives its own)."""

    def __init__(self, detail: str, advice: str) -> None:
        self.detail = detail
        super().__init__(f"{detail}; {advice}")


@dataclass(frozen=True)
class Reply:
    """One answer and how it was produced.

    Attributes:
        text: the answer, surrounding whitespace stripped.
        finish_reason: "eos" (the model ended its answer), "stop" (a stop string; the text
            ends before it) or "length" (max_new_tokens reached).
        new_tokens: tokens generated (EOS included).
        fed_tokens: tokens the model read this round (not in the cache).
        cached_tokens: tokens reused from the cache.
        image_numbers: the numbers (`### Image k:`) given to this round's images.
        dropped_rounds: rounds dropped to make room (overflow "drop_oldest").
    """

    text: str
    finish_reason: str
    new_tokens: int
    fed_tokens: int
    cached_tokens: int
    image_numbers: list[int]
    dropped_rounds: int = 0


@dataclass
class Round:
    """A finished round: its text, images and ids (prompt from BOS to `### Answer:\\n`)."""

    question: str
    images: list[str]
    pixels: torch.Tensor
    prompt_ids: list[int]
    answer: str
    answer_ids: list[int] = field(default_factory=list)
    finish_reason: str = "eos"


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


@dataclass
class Plan:
    """The next round before it runs: kept rounds, their history ids and cache, the prompt."""

    rounds: list[Round]
    history: list[int]
    cache: Any
    dropped: int
    prompt: list[int]
