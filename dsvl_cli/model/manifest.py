"""`manifest.json`: the list of files a dsvl folder was written with, checked before it is loaded.

Exports, fused folders and training checkpoints end with a manifest, written after every other
file (and fsynced with them before the folder gets its name), so a folder with a manifest that
checks out is the whole folder that was written:

    {"format": "dsvl-manifest", "version": 1, "dsvl_version": "...",
     "files": {"model.safetensors": {"size": 123456},
               "meta.json": {"size": 321, "sha256": "..."},
               "config.yaml": {"size": 987, "sha256": "...", "editable": true}}}

Paths are relative, with `/`. Sizes are always checked: a missing or truncated file (a killed
write, a full disk, a partial copy) is the failure that matters, and a size costs one stat. Files
up to `HASH_LIMIT` (64 MiB: configs, meta, tokenizers, small adapters) also carry a sha256 that
is checked on every load; bigger ones (weight shards of many GB) are only size-checked, because
hashing them would add minutes to every load. An `editable` file (an export's config.yaml, which
users may point at moved base models) only has to exist. Files the manifest does not list are
ignored. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from dsvl_cli import __version__
from dsvl_cli.atomic import aside_sibling, tmp_sibling
from dsvl_cli.errors import CheckpointError
from dsvl_cli.log import get_logger

log = get_logger(__name__)

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "dsvl-manifest"
HASH_LIMIT = 64 * 2**20
# config.yaml, meta.json, model.safetensors: what every export and fused folder has had since the
# first release; a model folder written before manifests must have them (named here, not in
# model/folder.py, so that run_dir.py can check exports without importing torch).
MODEL_FOLDER_FILES = ("config.yaml", "meta.json", "model.safetensors")
_CHUNK = 2**20


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _entry(path: Path, editable: bool) -> dict[str, Any]:
    size = path.stat().st_size
    entry: dict[str, Any] = {"size": size}
    if size <= HASH_LIMIT:
        entry["sha256"] = sha256(path)
    if editable:
        entry["editable"] = True
    return entry


def write_manifest(folder: Path, editable: Iterable[str] = ()) -> int:
    """Write `folder/manifest.json` listing every file under it; call it after the last file.

    `editable` names relative paths that only have to exist on load. Returns the file count.
    """
    editable = set(editable)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != MANIFEST_FILE:
            files[rel] = _entry(path, rel in editable)
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "dsvl_version": __version__,
        "files": files,
    }
    target = folder / MANIFEST_FILE
    with target.open("w", encoding="utf-8") as handle:
        handle.write(json.dumps(manifest, indent=1) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return len(files)


def has_manifest(folder: Path) -> bool:
    return (folder / MANIFEST_FILE).is_file()


def _read_files(folder: Path) -> dict[str, Any] | str:
    """The manifest's file table, or a problem line when it cannot be read."""
    try:
        data = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{MANIFEST_FILE} is unreadable ({err})"
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or data.get("format") != MANIFEST_FORMAT:
        return f"{MANIFEST_FILE} is not a dsvl manifest"
    return files


def _file_problem(folder: Path, rel: str, entry: dict[str, Any]) -> str | None:
    path = folder / rel
    if not path.is_file():
        return f"{rel} is missing"
    if entry.get("editable"):
        return None
    size = path.stat().st_size
    if size != entry.get("size"):
        return f"{rel} has {size} bytes, {MANIFEST_FILE} says {entry.get('size')}"
    if "sha256" in entry and sha256(path) != entry["sha256"]:
        return f"{rel} differs from the file written (sha256 mismatch)"
    return None


def manifest_problem(folder: Path) -> str | None:
    """The first file of the manifest that is missing, of the wrong size or changed; else None.

    The folder must have a manifest (see `has_manifest`).
    """
    files = _read_files(folder)
    if isinstance(files, str):
        return files
    for rel, entry in files.items():
        if problem := _file_problem(folder, rel, entry if isinstance(entry, dict) else {}):
            return problem
    return None


def folder_problem(folder: Path, required: Sequence[str]) -> str | None:
    """Why `folder` is not complete, or None.

    With a manifest, the manifest decides. Without one (written before manifests existed), every
    file in `required` (the files the format always had) must exist and be non-empty.
    """
    if not folder.is_dir():
        return "the folder does not exist"
    if has_manifest(folder):
        return manifest_problem(folder)
    for rel in required:
        path = folder / rel
        if not path.is_file() or path.stat().st_size == 0:
            return f"{rel} is missing (and there is no {MANIFEST_FILE})"
    return None


def spare_copy(folder: Path, required: Sequence[str]) -> Path | None:
    """A complete copy an interrupted replace left beside `folder` (`.NAME.tmp`, `.NAME.old`)."""
    for spare in (tmp_sibling(folder), aside_sibling(folder)):
        if spare.is_dir() and folder_problem(spare, required) is None:
            return spare
    return None


def require_complete(folder: Path, required: Sequence[str], fix: str) -> None:
    """CheckpointError naming the folder, its first missing or short file and `fix`.

    A complete spare copy beside it (see `spare_copy`) is named first in the fix. A folder
    without a manifest that has its `required` files is accepted with a warning.
    """
    if problem := folder_problem(folder, required):
        if spare := spare_copy(folder, required):
            fix = f"a complete copy is at {spare}: move it back (mv {spare} {folder}), or {fix}"
        what = "does not exist" if not folder.exists() else f"is incomplete: {problem}"
        raise CheckpointError(f"{folder} {what}; {fix}")
    if not has_manifest(folder):
        log.warning(
            "%s has no %s (written by an earlier dsvl): only its main files were checked for "
            "completeness; written again, it gets one",
            folder,
            MANIFEST_FILE,
        )
