"""Prepared conversations as `dsvl eval` reads them: a bad sample fails alone, before the model.

Each line of a prepared JSONL file (`dsvl prepare-data`) is one sample. A line that is not JSON
or not a conversation, and a conversation with an image that cannot be found or decoded, becomes
a `SampleFailure`: counted, listed in metrics.json, predictions.jsonl and the printed summary,
and left out of the scores. Images are found by the rule every eval input follows
(`dsvl_cli.data.image_refs.locate_image`: under the image root as written, then by shorter
tails) and handed on as absolute paths, so scoring reads exactly the files checked here. Only
when no sample is left is the file refused (DataError, exit 2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from dsvl_cli.data.conversation import Conversation
from dsvl_cli.data.image_refs import find_image
from dsvl_cli.data.json_files import iter_jsonl
from dsvl_cli.errors import DataError

Stage = str  # "read" | "images" | "loss" | "accuracy": where a sample failed


@dataclass(frozen=True)
class SampleFailure:
    """A sample that could not be scored: where (line, id), at which stage, and why."""

    stage: Stage
    reason: str
    error: str
    id: str = ""
    line: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PreparedInput:
    """The conversations to score (image paths absolute) and the samples that failed."""

    conversations: list[Conversation] = field(default_factory=list)
    failures: list[SampleFailure] = field(default_factory=list)


def _image_error(ref: str, root: Path, found: dict[str, Any]) -> tuple[str, str | None, str]:
    """(absolute path, failure reason or None, error) for one image reference, cached."""
    if ref not in found:
        path, reason, error = find_image(ref, root)
        found[ref] = ("" if path is None else str(path), reason, error or "")
    return found[ref]


def _with_images(
    conv: Conversation, line: int, root: Path, found: dict[str, Any]
) -> Conversation | SampleFailure:
    """`conv` with absolute image paths, or the failure of its first bad image."""
    paths = []
    for ref in conv.images:
        path, reason, error = _image_error(ref, root, found)
        if reason is not None:
            return SampleFailure("images", reason, error, conv.id, line)
        paths.append(path)
    return replace(conv, images=paths)


def read_prepared(path: Path, root: Path, limit: int | None = None) -> PreparedInput:
    """The first `limit` lines of `path`: conversations to score and samples that failed.

    Raises:
        DataError: the file cannot be read, or no sample in it can be scored.
    """
    result, found = PreparedInput(), {}
    seen = 0
    for line in iter_jsonl(path):
        if limit is not None and seen >= limit:
            break
        seen += 1
        where = f"{path}:{line.lineno}"
        if line.error is not None:
            error = f"{where}: not valid JSON ({line.error})"
            result.failures.append(SampleFailure("read", "bad_json", error, line=line.lineno))
            continue
        try:
            conv = Conversation.from_dict(line.value, where=where)
        except DataError as err:
            result.failures.append(SampleFailure("read", "bad_record", str(err), line=line.lineno))
            continue
        checked = _with_images(conv, line.lineno, root, found)
        if isinstance(checked, SampleFailure):
            result.failures.append(checked)
        else:
            result.conversations.append(checked)
    if not result.conversations:
        first = f"; line {result.failures[0].line}: {result.failures[0].error}" if seen else ""
        hint = ""
        if any(f.reason == "image_missing" for f in result.failures):
            hint = "; set --image-root to the folder that holds the images (rule: dsvl eval --help)"
        raise DataError(f"{path}: no conversation can be scored ({seen} read){first}{hint}")
    return result
