"""`TokenCache`: tokenised training conversations kept in memory, so each is encoded once per run.

Every epoch renders and tokenises the same conversations again (the DSVL template over the
tokenizer: about 0.4 ms per conversation on a CPU core, a tenth of a CPU demo step's time per
sample). The cache keeps, per conversation object, what the encoder made of it: the id and label
tensors and the image count, or the reason it was skipped (so a skipped sample is still counted
every epoch). Entries are keyed by object identity and hold the conversation, so an identity is
never reused while its entry lives; this fits splits whose conversation objects recur every epoch
(no `concat` grouping). Memory is bounded (`data.token_cache_mb`); conversations past the bound
are encoded each time, as without it. The cache lives in the process that encodes: the trainer
builds it only without DataLoader workers (`data.workers: 0`), where that is the main process
for every epoch and evaluation. Length-based samplers (`data.packing`, `data.group_by_length`)
read their lengths through it too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from torch import Tensor

from dsvl_cli.data.conversation import Conversation

MB = 1 << 20
# Bytes per entry beside the tensors' data (dict slot, tuples, two tensor objects and their
# storages): measured as process growth over 100k entries, ~1.3 KB more than the data.
_ENTRY_OVERHEAD = 1400

T = TypeVar("T")


def _nbytes(value: object) -> int:
    """Bytes held by the tensors of a cached value (a tuple of tensors and ints, or a skip)."""
    parts = value if isinstance(value, tuple) else (value,)
    tensors = (p for p in parts if isinstance(p, Tensor))
    return _ENTRY_OVERHEAD + sum(t.numel() * t.element_size() for t in tensors)


class TokenCache(Generic[T]):
    """Per-conversation memo of an encoding, up to `max_mb` MiB (see the module doc)."""

    def __init__(self, max_mb: int) -> None:
        self.budget = max_mb * MB
        self.used = 0
        self.entries: dict[int, tuple[Conversation, T]] = {}
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, conv: Conversation, make: Callable[[], T]) -> T:
        """The encoding of `conv`: cached, or `make()` (stored while the budget allows)."""
        entry = self.entries.get(id(conv))
        if entry is not None:  # the entry holds `conv`, so its id cannot belong to another object
            self.hits += 1
            return entry[1]
        self.misses += 1
        value = make()
        size = _nbytes(value)
        if self.used + size <= self.budget:
            self.entries[id(conv)] = (conv, value)
            self.used += size
        return value
