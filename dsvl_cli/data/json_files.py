"""Reading JSON and JSONL files: the one reader behind every data input.

Raw dataset files, user files (llava_json, messages), prepared JSONL and eval sets all go through
here, so they accept the same text: UTF-8 with or without a byte-order mark. Editors on Windows
save one, and `json` rejects it as an invalid first character (a JSON list with a BOM then looked
like JSONL and every line was dropped).

`stream_object` walks a top-level JSON object one (key, value) at a time with ijson, so memory
holds one value, not the file (MIMIC-IT's image files are several GB).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import ijson

from dsvl_cli.errors import DataError

ENCODING = "utf-8-sig"  # UTF-8; a leading byte-order mark is skipped if there is one
UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class JsonLine:
    """One non-blank line of a JSONL file: its value, or `error` (the parser's message)."""

    lineno: int
    value: Any = None
    error: str | None = None


def read_json(path: str | Path) -> Any:
    """Load a whole JSON file; DataError naming the file if it cannot be read or parsed."""
    try:
        with open(path, encoding=ENCODING) as fh:
            return json.load(fh)
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
        ) from None


def iter_jsonl(path: str | Path) -> Iterator[JsonLine]:
    """Yield each non-blank line of a JSONL file, parsed or with its error (callers decide).

    Raises DataError if the file cannot be read or is not UTF-8.
    """
    try:
        with open(path, encoding=ENCODING) as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    yield JsonLine(lineno, json.loads(line))
                except json.JSONDecodeError as err:
                    yield JsonLine(lineno, error=err.msg)
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None


def first_char(path: str | Path) -> str:
    """The first non-whitespace character of a text file, after any BOM ('' if empty)."""
    try:
        with open(path, encoding=ENCODING) as fh:
            while chunk := fh.read(4096):
                stripped = chunk.lstrip()
                if stripped:
                    return stripped[0]
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    return ""


def _skip_bom(fh: IO[bytes]) -> None:
    """Position a binary file after its UTF-8 BOM, or at the start if it has none."""
    if fh.read(len(UTF8_BOM)) != UTF8_BOM:
        fh.seek(0)


def stream_object(path: str | Path, what: str) -> Iterator[tuple[str, Any]]:
    """Yield (key, value) of a file's top-level JSON object, one at a time (ijson).

    Memory holds one value at a time, whatever the file's size. `what` describes the expected
    content for the error message. Raises DataError if the top level is not an object or the
    file is not valid JSON (pairs before the fault have already been yielded).
    """
    if first_char(path) != "{":
        raise DataError(f"{path}: expected {what} (a JSON object); is this the right file?")
    with open(path, "rb") as fh:
        _skip_bom(fh)
        try:
            yield from ijson.kvitems(fh, "", use_float=True)
        except ijson.JSONError as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DataError(f"{path}: not valid JSON ({reason}); re-download the file") from None
