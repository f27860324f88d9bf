"""Replacing a folder so that a kill at any moment leaves a complete copy under a known name.

A writer fills `.NAME.tmp` beside `NAME`, then `replace_dir` publishes it:

    1. fsync every file and folder of `.NAME.tmp`     (its bytes are on disk before any rename)
    2. rename `NAME` -> `.NAME.old`                   (the old copy stays whole, aside)
    3. rename `.NAME.tmp` -> `NAME`                   (fsync of the parent after each rename)
    4. delete `.NAME.old`

A kill before 3 leaves the old copy at `NAME` or `.NAME.old`; a kill after 3 leaves the new one at
`NAME`. `recover_dir` finishes or undoes an interrupted swap: it keeps `NAME` when complete,
otherwise promotes a complete `.NAME.tmp`, otherwise restores a complete `.NAME.old`. What
"complete" means is the caller's (for model folders: their manifest checks out).

Never rename-over a folder with `os.replace`: POSIX refuses a non-empty target, and deleting it
first is exactly the window in which a kill leaves nothing whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from dsvl_cli.log import get_logger

log = get_logger(__name__)

TMP_SUFFIX = ".tmp"
ASIDE_SUFFIX = ".old"


def tmp_sibling(out: Path) -> Path:
    """Where the next copy of `out` is written: `.NAME.tmp` beside it (hidden from discovery)."""
    return out.with_name(f".{out.name}{TMP_SUFFIX}")


def aside_sibling(out: Path) -> Path:
    """Where the previous copy of `out` waits during a swap: `.NAME.old` beside it."""
    return out.with_name(f".{out.name}{ASIDE_SUFFIX}")


def fresh_tmp(out: Path) -> Path:
    """An empty `.NAME.tmp` beside `out` (a leftover from an interrupted write is deleted)."""
    tmp = tmp_sibling(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def fsync_path(path: Path) -> None:
    """Flush one file's or folder's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (folders after their entries), then `root`."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def replace_dir(tmp: Path, out: Path) -> None:
    """Publish the finished folder `tmp` as `out`, keeping a whole copy at every moment."""
    fsync_tree(tmp)
    aside = aside_sibling(out)
    if out.exists():
        # A stale aside copy means `out` was published after it; it is not needed any more.
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(out, aside)
        fsync_path(out.parent)
    try:
        os.rename(tmp, out)
    except OSError:
        if aside.exists() and not out.exists():
            os.rename(aside, out)  # put the previous copy back rather than leave none
        raise
    fsync_path(out.parent)
    shutil.rmtree(aside, ignore_errors=True)


def recover_dir(out: Path, is_complete: Callable[[Path], bool]) -> str | None:
    """Finish or undo an interrupted `replace_dir` of `out`; returns what was done, or None.

    `out` complete: leftovers are deleted. Otherwise a complete `.NAME.tmp` (the interrupted
    swap's new copy) or else a complete `.NAME.old` (the previous copy) becomes `out`. With
    nothing complete to take its place, an incomplete `out` is left as it is (loaders refuse it).
    """
    tmp, aside = tmp_sibling(out), aside_sibling(out)
    if out.exists() and is_complete(out):
        for leftover in (tmp, aside):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
                log.info("removed %s, left by an interrupted write of %s", leftover, out)
        return None
    for source, what in ((tmp, "the interrupted write's new copy"), (aside, "the previous copy")):
        if source.exists() and is_complete(source):
            _move_in(source, out)
            for leftover in (tmp, aside):
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(leftover)
            return f"restored {out} from {what} ({source.name})"
    return None


def _move_in(source: Path, out: Path) -> None:
    """Rename `source` to `out`, deleting an incomplete `out` first."""
    if out.exists():
        shutil.rmtree(out)
    os.rename(source, out)
    fsync_path(out.parent)
