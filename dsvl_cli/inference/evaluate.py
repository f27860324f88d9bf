"""`dsvl eval`: the original's eval sets (multi-round, multi-image) and prepared held-out data.

Two kinds of `--data`, told apart by the file name:

* ``*.json``: the original DSVL's eval format: an object mapping test
  name -> ordered list of rounds, each ``[question]`` or ``[question, "img1 img2 ..."]``.
  Image paths are relative to ``--image-root`` (default: the JSON's folder). Every test runs as
  one conversation in a fresh `ChatSession`; a round's images attach to that round and are
  numbered across the test as in training. Writes ``<stem>.csv`` with the original's columns
  (test_name, image_path, question, answer; ``image_path`` holds the round's paths joined by a
  space and is empty for a text-only round, where the original repeated the question) and
  ``<stem>.jsonl`` with full records (image numbers, finish reason, settings, model, version).
  Not batched: a test's rounds depend on each other, and batching tests would need left-padded
  KV caches realigned every round; the sets are small (9 to 65 rounds) and each round only feeds
  its new tokens.
* ``*.jsonl``: prepared conversations (`dsvl prepare-data`): loss, perplexity and exact-match
  accuracy, see `dsvl_cli.inference.scoring`.

``--limit N`` keeps the first N tests (eval sets) or conversations (prepared data).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dsvl_cli import __version__
from dsvl_cli.data.image_refs import resolve_image_ref
from dsvl_cli.data.images import check_image
from dsvl_cli.data.json_files import read_json
from dsvl_cli.errors import DataError, DsvlError
from dsvl_cli.inference.generation import GenerationSettings
from dsvl_cli.inference.session import ChatSession, Overflow
from dsvl_cli.log import get_logger

log = get_logger(__name__)

CSV_COLUMNS = ("test_name", "image_path", "question", "answer")
MAX_LISTED = 5  # bad images named in one error message


@dataclass(frozen=True)
class EvalRound:
    """One round of an eval test: the question and its images (as written, and resolved)."""

    question: str
    images: tuple[str, ...]
    paths: tuple[Path, ...]


@dataclass(frozen=True)
class EvalTest:
    name: str
    rounds: tuple[EvalRound, ...]


def _parse_round(raw: Any, where: str, root: Path) -> EvalRound:
    ok = isinstance(raw, list) and len(raw) in (1, 2) and all(isinstance(x, str) for x in raw)
    if not ok or not raw[0].strip():
        raise DataError(
            f'{where}: a round must be [question] or [question, "img1 img2 ..."] with a '
            f"non-empty question, got {raw!r}"
        )
    images = tuple(raw[1].split()) if len(raw) == 2 else ()
    return EvalRound(raw[0], images, tuple(resolve_image_ref(p, root) for p in images))


def read_eval_set(
    path: Path, image_root: Path | None = None, limit: int | None = None
) -> list[EvalTest]:
    """Parse an eval JSON file (see the module docstring); DataError naming what is wrong."""
    try:
        data = read_json(path)  # the shared reader: a byte-order mark is accepted
    except OSError as err:
        raise DataError(f"cannot read eval set {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected an object mapping test name -> list of rounds")
    root = image_root if image_root is not None else path.parent
    tests = []
    for name, rounds in list(data.items())[:limit]:
        if not isinstance(rounds, list) or not rounds:
            raise DataError(f"{path}: test {name!r} must be a non-empty list of rounds")
        parsed = [
            _parse_round(r, f"{path}: test {name!r} round {i}", root)
            for i, r in enumerate(rounds, 1)
        ]
        tests.append(EvalTest(name, tuple(parsed)))
    return tests


def check_eval_images(tests: Sequence[EvalTest], root: Path) -> None:
    """Fully decode every image once, before the model loads; DataError listing the bad ones."""
    bad = []
    for path in sorted({p for t in tests for r in t.rounds for p in r.paths}):
        reason = check_image(path)
        if reason is not None:
            bad.append(f"{path} ({reason})")
    if bad:
        listed = ", ".join(bad[:MAX_LISTED]) + (
            f" and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        )
        raise DataError(
            f"{len(bad)} eval image(s) cannot be used: {listed}; image paths are relative to "
            f"{root} (set --image-root to the folder they start from)"
        )


def _round_record(
    test: EvalTest, index: int, rnd: EvalRound, session: ChatSession
) -> dict[str, Any]:
    """Ask one round; the record holds the answer or the error (the test goes on)."""
    record: dict[str, Any] = {
        "test_name": test.name,
        "round": index,
        "question": rnd.question,
        "image_paths": list(rnd.images),
    }
    try:
        reply = session.ask(rnd.question, rnd.paths)
    except DsvlError as err:
        log.warning("test %r round %d: %s", test.name, index, err)
        return {
            **record,
            "image_numbers": [],
            "answer": "",
            "finish_reason": None,
            "error": str(err),
        }
    return {
        **record,
        "image_numbers": reply.image_numbers,
        "answer": reply.text,
        "finish_reason": reply.finish_reason,
        "new_tokens": reply.new_tokens,
        "dropped_rounds": reply.dropped_rounds,
        "error": None,
    }


def run_eval_set(
    session: ChatSession, tests: Sequence[EvalTest], out: Path, stem: str, model_folder: Path
) -> list[dict[str, Any]]:
    """Run every test as one conversation; write `<stem>.csv` and `<stem>.jsonl` in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    common = {
        "model": str(model_folder),
        "dsvl_version": __version__,
        "generation": session.settings.to_dict(),
    }
    records = []
    for number, test in enumerate(tests, 1):
        log.info("test %d/%d %r: %d round(s)", number, len(tests), test.name, len(test.rounds))
        session.clear()
        for index, rnd in enumerate(test.rounds, 1):
            records.append({**_round_record(test, index, rnd, session), **common})
    with open(out / f"{stem}.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for r in records:
            writer.writerow(
                [r["test_name"], " ".join(r["image_paths"]), r["question"], r["answer"]]
            )
    with open(out / f"{stem}.jsonl", "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return records


def _summarise_eval_set(
    records: list[dict[str, Any]], out: Path, stem: str, console: Console
) -> dict[str, Any]:
    summary = {
        "tests": len({r["test_name"] for r in records}),
        "rounds": len(records),
        "images": sum(len(r["image_paths"]) for r in records),
        "cut_at_max_new_tokens": sum(r["finish_reason"] == "length" for r in records),
        "errors": sum(r["error"] is not None for r in records),
        "csv": str(out / f"{stem}.csv"),
        "jsonl": str(out / f"{stem}.jsonl"),
    }
    table = Table(title=f"eval {stem}")
    table.add_column("item")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, str(value))
    console.print(table)
    console.print(f"results: {summary['csv']}, {summary['jsonl']}", highlight=False, soft_wrap=True)
    return summary


def run_eval(
    model: Path,
    data: Path,
    out: Path,
    limit: int | None = None,
    image_root: Path | None = None,
    batch_size: int = 8,
    settings: GenerationSettings | None = None,
    device: str = "auto",
    dtype: str = "auto",
    device_map: str | None = None,
    overflow: Overflow = "error",
    console: Console | None = None,
    base_lm: Path | None = None,
    base_vision: Path | None = None,
) -> dict[str, Any]:
    """`dsvl eval MODEL --data PATH --out DIR`: run an eval set or score prepared data.

    Inputs are checked before the model loads; `base_lm` / `base_vision` point an export at its
    base models on this machine (see `load_for_inference`). Returns the summary that is also
    printed (eval sets: counts and output files; prepared data: the metrics in metrics.json).
    """
    from dsvl_cli.inference.loader import LoadedModel, load_for_inference

    console = console or Console(soft_wrap=True)
    settings = settings or GenerationSettings()

    def load() -> LoadedModel:
        return load_for_inference(model, device, dtype, device_map, base_lm, base_vision)

    if limit is not None and limit < 1:
        raise DataError(f"--limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {batch_size}")
    if not data.is_file():
        raise DataError(f"--data {data}: no such file")
    if data.suffix == ".jsonl":
        from dsvl_cli.inference.scoring import read_prepared, score_prepared

        conversations = read_prepared(data, limit)
        loaded = load()
        root = image_root if image_root is not None else data.parent
        return score_prepared(loaded, data, conversations, root, out, batch_size, settings, console)
    if data.suffix != ".json":
        raise DataError(
            f"--data {data}: expected an eval set (.json, test name -> rounds) or prepared "
            "conversations (.jsonl from dsvl prepare-data)"
        )
    tests = read_eval_set(data, image_root, limit)
    check_eval_images(tests, image_root if image_root is not None else data.parent)
    loaded = load()
    session = ChatSession.from_loaded(loaded, settings, overflow=overflow)
    records = run_eval_set(session, tests, out, data.stem, Path(model))
    return _summarise_eval_set(records, out, data.stem, console)
