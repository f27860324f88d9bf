"""Helpers for sources that read user-given files (llava_json, messages): finding the files and
reading JSON or JSONL records; and `resolve_image`, the image-reference step of every source."""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dsvl_cli.data.image_refs import ImageRefError, is_data_uri, resolve_image_ref
from dsvl_cli.data.json_files import first_char, iter_jsonl, read_json
from dsvl_cli.data.sources.base import SourceContext, expect_type


def input_files(ctx: SourceContext) -> list[Path]:
    """The files to read: `ctx.files` if given, else `ctx.data_path` when it is a file."""
    if ctx.files:
        return [Path(f) for f in ctx.files]
    return [Path(ctx.data_path)]


def check_files(ctx: SourceContext, name: str, example: str) -> list[str]:
    """Messages for missing input files (a folder as data_path without `files` is one)."""
    problems = []
    for path in input_files(ctx):
        if path.is_dir():
            problems.append(
                f"{path} is a folder: {name} reads one file, e.g. data_path={example} "
                "(or list files explicitly)"
            )
        elif not path.is_file():
            problems.append(f"{path} not found: {name} needs an existing {example} file")
    return problems


def iter_records(path: Path, ctx: SourceContext) -> Iterator[tuple[str, Any]]:
    """Yield (where, record) from a JSON list, or from JSONL (by `.jsonl` suffix or content).

    A malformed JSONL line is dropped as "malformed_record"; an unreadable JSON file raises.
    Both accept UTF-8 with or without a byte-order mark (data/json_files.py).
    """
    if path.suffix.lower() != ".jsonl" and first_char(path) == "[":
        records = expect_type(read_json(path), list, path, "a list of records")
        for index, record in enumerate(records):
            yield f"{path}[{index}]", record
        return
    for line in iter_jsonl(path):
        where = f"{path}:{line.lineno}"
        if line.error is None:
            yield where, line.value
        else:
            ctx.drop("malformed_record", where)


def image_root(ctx: SourceContext, ann_path: Path) -> Path:
    """Folder relative image paths are resolved against: ctx.image_root or the file's folder."""
    return Path(ctx.image_root) if ctx.image_root is not None else ann_path.parent


def resolve_image(ref: str, root: Path, ctx: SourceContext, source: str) -> tuple[str | None, str]:
    """Turn an image reference from raw data into a path for the prepared file.

    Every source calls this for the image strings it reads. Returns (path, "") on success or
    (None, drop reason). `data:` URIs are decoded into `ctx.image_out/<source>/`; everything
    else goes through `resolve_image_ref` (absolute, relative to `root`, `file:` URIs; remote
    URLs refused as "remote_image").
    """
    if is_data_uri(ref):
        return decode_data_uri(ref, ctx, source)
    try:
        return str(resolve_image_ref(ref, root)), ""
    except ImageRefError as err:
        return None, err.reason


def decode_data_uri(uri: str, ctx: SourceContext, source: str) -> tuple[str | None, str]:
    """Write a `data:image/...;base64,` URI to `image_out/<source>/<sha1>.<ext>` once."""
    header, _, payload = uri.partition(",")
    data = decode_base64(payload) if ";base64" in header else b""
    if not data:
        return None, "bad_image_data"
    ext = header.removeprefix("data:").split(";")[0].rpartition("/")[2] or "img"
    out = ctx.image_out / source / f"{hashlib.sha1(data).hexdigest()}.{ext}"
    write_once(out, data)
    return ctx.written_image(out), ""


def decode_base64(blob: Any) -> bytes:
    """Bytes of a base64 string (line wraps tolerated); b"" if it is not valid base64."""
    if not isinstance(blob, str):
        return b""
    try:
        return base64.b64decode("".join(blob.split()), validate=True)
    except (binascii.Error, ValueError):
        return b""


def write_once(path: Path, data: bytes) -> None:
    """Write bytes unless an identical-size file is already there (re-runs skip the work)."""
    if path.is_file() and path.stat().st_size == len(data):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)  # atomic: an interrupted run never leaves a truncated image
