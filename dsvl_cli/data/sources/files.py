"""Helpers for sources that read user-given files (llava_json, messages): finding the files,
reading JSON or JSONL records, resolving image references."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dsvl_cli.data.sources.base import SourceContext, expect_type, read_json

REMOTE_SCHEMES = ("http://", "https://", "ftp://", "s3://", "gs://")


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
    """
    if path.suffix.lower() != ".jsonl" and _first_char(path) == "[":
        records = expect_type(read_json(path), list, path, "a list of records")
        for index, record in enumerate(records):
            yield f"{path}[{index}]", record
        return
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError:
                ctx.drop("malformed_record", where)


def _first_char(path: Path) -> str:
    """The first non-whitespace character of a text file ('' if empty)."""
    with open(path, encoding="utf-8") as fh:
        while chunk := fh.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0]
    return ""


def image_root(ctx: SourceContext, ann_path: Path) -> Path:
    """Folder relative image paths are resolved against: ctx.image_root or the file's folder."""
    return Path(ctx.image_root) if ctx.image_root is not None else ann_path.parent


def resolve_image(ref: str, root: Path, ctx: SourceContext, source: str) -> tuple[str | None, str]:
    """Turn an image reference into a path for the prepared file.

    Returns (path, "") on success or (None, drop reason). Local paths (absolute, relative to
    `root`, or `file://`) become absolute; `data:` URIs are decoded into `ctx.image_out/<source>/`;
    remote URLs are refused ("remote_image"): dsvl prepares data offline and never downloads.
    """
    if ref.startswith("data:"):
        return decode_data_uri(ref, ctx, source)
    if ref.startswith(REMOTE_SCHEMES):
        return None, "remote_image"
    path = Path(ref.removeprefix("file://")).expanduser()
    return str(path if path.is_absolute() else (root / path).absolute()), ""


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
