"""Checking many image files at once, on every core, with results in input order.

`prepare-data` decodes every referenced image once (`images.check_image`, a full decode) so that
a bad file is dropped with a reason before training. Decoding is CPU-bound Python + C work that
threads do not spread over cores, so `check_paths` runs it in a process pool. Results come back
in input order (`Executor.map`), so what is kept and dropped does not depend on the worker count.

Workers start with "spawn": a child imports only what `check_image` needs and inherits no lock
a parent thread (the progress bar's refresher, a logging handler) might hold at fork time.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from dsvl_cli.data.images import ImageFailure, check_image
from dsvl_cli.errors import DataError

MAX_CHUNK = 64  # images per task sent to a worker: fewer round trips, still smooth progress


def default_workers() -> int:
    """The default worker count: every core `os.cpu_count()` reports (at least 1)."""
    return os.cpu_count() or 1


def check_workers(workers: int) -> int:
    """`workers` if it is at least 1; DataError naming the --workers flag otherwise."""
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    return workers


def check_paths(
    paths: Sequence[str | Path],
    workers: int,
    advance: Callable[[int], None] | None = None,
) -> list[ImageFailure | None]:
    """Fully decode every path; the failure reason per path (None if it loads), in input order.

    Args:
        paths: image files to check.
        workers: processes to use; 1 checks in this process (no pool is started).
        advance: called with the number of images finished, as they finish (progress display).
    """
    check_workers(workers)
    advance = advance or (lambda _n: None)
    workers = min(workers, len(paths))
    results: list[ImageFailure | None] = []
    if workers <= 1:
        for path in paths:
            results.append(check_image(path))
            advance(1)
        return results
    chunk = max(1, min(MAX_CHUNK, len(paths) // (workers * 4)))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        for failure in pool.map(check_image, paths, chunksize=chunk):
            results.append(failure)
            advance(1)
    return results
