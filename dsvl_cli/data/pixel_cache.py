"""`PixelCache`: processed images kept in memory, so each is decoded once per run.

Every epoch (and every evaluation) re-reads, decodes and re-runs the image processor on the same
files; for a small data set (the CPU demo: 13,100 images of 3 x 32 x 32 floats, 160 MB) that was
a fifth of a CPU step. The trainer builds one cache for the whole run from the training images
it will read, then the eval images
(`data.pixel_cache_mb` bounds it): one slot per distinct image, in first-seen order, until the
bound; images past it are processed each time as before. With DataLoader workers the slots live
in shared memory, so every worker fills and reads the same slots and they survive the per-epoch
loaders (one copy, not one per worker); the shared part is also kept within half of the free
space in `/dev/shm`, which container runtimes often make small. A failing image is never cached,
so it fails (and is counted) every time it is read.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Hashable, Iterable

import torch
from torch import Tensor

from dsvl_cli.log import get_logger

log = get_logger(__name__)

MB = 1 << 20
SHM = "/dev/shm"


def _shm_budget() -> int | None:
    """Half the free bytes of /dev/shm (None where it does not exist)."""
    try:
        return shutil.disk_usage(SHM).free // 2
    except OSError:
        return None


class PixelCache:
    """Fixed slots for known image keys; `get` fills a slot on first use and reads it after.

    Args:
        keys: the images training will read (e.g. `(base_dir, ref)`), repeats allowed.
        image_shape: (3, H, W) of one processed image (float32).
        max_mb: memory bound in MiB.
        shared: put the slots in shared memory (DataLoader workers).
    """

    def __init__(
        self, keys: Iterable[Hashable], image_shape: tuple[int, ...], max_mb: int, shared: bool
    ) -> None:
        per_image = 4 * math.prod(image_shape)
        budget = max_mb * MB
        shm = _shm_budget() if shared else None
        if shm is not None and shm < budget:
            log.info("pixel cache: /dev/shm has room for %.0f MB of it", shm / MB)
            budget = shm
        capacity = budget // per_image
        self.slots: dict[Hashable, int] = {}
        distinct: set[Hashable] = set()
        for key in keys:
            distinct.add(key)
            if key not in self.slots and len(self.slots) < capacity:
                self.slots[key] = len(self.slots)
        count = len(self.slots)
        self.pixels = torch.zeros((count, *image_shape), dtype=torch.float32)
        self.filled = torch.zeros(count, dtype=torch.bool)
        if shared:
            self.pixels.share_memory_()
            self.filled.share_memory_()
        self.hits = self.misses = 0
        log.info(
            "pixel cache (data.pixel_cache_mb): %d of %d images, %.0f MB%s",
            count,
            len(distinct),
            count * per_image / MB,
            "" if count == len(distinct) else "; the others are processed each time they are read",
        )

    def __len__(self) -> int:
        """Slots filled so far (by any process)."""
        return int(self.filled.sum())

    def get(self, key: Hashable, make: Callable[[], Tensor]) -> Tensor:
        """The tensor for `key`: from its slot, or `make()` (stored when `key` has a slot)."""
        slot = self.slots.get(key)
        if slot is not None and bool(self.filled[slot]):
            self.hits += 1
            return self.pixels[slot]
        self.misses += 1
        tensor = make()  # errors propagate: a failing image is never cached
        if slot is not None:
            self.pixels[slot].copy_(tensor)
            self.filled[slot] = True  # after the copy: a reader never sees a half-written slot
        return tensor
