"""The original DSVL's eval sets: read and check them, run them test by test, write CSV + JSONL.

Format: an object mapping test name -> ordered list of rounds, each ``[question]`` or
``[question, "img1 img2 ..."]``. Image paths are found under the image root (default: the JSON's
folder) by the one rule of `dsvl_cli.data.image_refs.locate_image`: as written, then by shorter
tails, so ``./eval/eval_data/images/cats/1.jpg`` is found from the JSON's folder, from
``images/`` or from ``cats/``. Every test runs as one conversation in a fresh `ChatSession`; a
round's images attach to that round and are numbered across the test as in training.

A test is the unit that fails. Before the model loads, every image is found and fully decoded
once; a test with a malformed round or an image that is missing or unusable does not run. While
the tests run, a round that fails (context full, too many images, out of GPU memory) fails its
test, and the test's later rounds do not run: they build on that round (they name its images by
number and follow its answer), so their answers would belong to another conversation than the
set defines. Every other test runs as usual. Failed tests are listed with their reason in both
files and in the printed summary; `dsvl eval` then exits 1. Only when no test can run is the set
refused as a whole (DataError, exit 2, before the model loads).

Outputs, written test by test (an interrupted run keeps the tests it finished):

* ``<stem>.csv``: the original's columns (test_name, image_path, question, answer), then status
  (ok | failed | not_run) and error. ``image_path`` holds the round's paths as written, joined by
  a space, empty for a text-only round (where the original repeated the question).
* ``<stem>.jsonl``: one record per round with the image files used, image numbers, finish
  reason, status, error, settings, model and version.

Not batched: a test's rounds depend on each other, and batching tests would need left-padded KV
caches realigned every round; the sets are small (9 to 65 rounds) and each round only feeds its
new tokens.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from dsvl_cli.data.image_refs import find_image
from dsvl_cli.data.json_files import read_json
from dsvl_cli.errors import DataError, DsvlError
from dsvl_cli.inference.session import ChatSession, ContextOverflow, Reply
from dsvl_cli.log import get_logger

log = get_logger(__name__)

CSV_COLUMNS = ("test_name", "image_path", "question", "answer", "status", "error")
OK, FAILED, NOT_RUN = "ok", "failed", "not_run"


@dataclass(frozen=True)
class EvalRound:
    """One round of an eval test: the question, its images as written and as found."""

    question: str
    images: tuple[str, ...]
    paths: tuple[Path, ...] = ()


@dataclass(frozen=True)
class EvalTest:
    """A named conversation; `error` (with `reason`) says why it cannot run, None if it can."""

    name: str
    rounds: tuple[EvalRound, ...]
    error: str | None = None
    reason: str | None = None


# ---------------------------------------------------------------------- reading


def _parse_round(raw: Any, index: int) -> EvalRound:
    ok = isinstance(raw, list) and len(raw) in (1, 2) and all(isinstance(x, str) for x in raw)
    if not ok or not raw[0].strip():
        raise DataError(
            f'round {index}: a round must be [question] or [question, "img1 img2 ..."] with a '
            f"non-empty question, got {raw!r}"
        )
    return EvalRound(raw[0], tuple(raw[1].split()) if len(raw) == 2 else ())


def _parse_test(name: str, rounds: Any) -> EvalTest:
    if not isinstance(rounds, list) or not rounds:
        return EvalTest(name, (), f"must be a non-empty list of rounds, got {rounds!r}", "bad_test")
    try:
        return EvalTest(name, tuple(_parse_round(r, i) for i, r in enumerate(rounds, 1)))
    except DataError as err:
        return EvalTest(name, (), str(err), "bad_round")


def _locate(test: EvalTest, root: Path, found: dict[str, Any]) -> EvalTest:
    """`test` with its image files, or with the first image that fails as its error."""
    if test.error is not None:
        return test
    rounds = []
    for index, rnd in enumerate(test.rounds, 1):
        paths = []
        for ref in rnd.images:
            if ref not in found:  # the sets reuse images across tests: check each once
                found[ref] = find_image(ref, root)
            path, reason, error = found[ref]
            if error is not None:
                return replace(test, error=f"round {index}: {error}", reason=reason)
            paths.append(path)
        rounds.append(replace(rnd, paths=tuple(paths)))
    return replace(test, rounds=tuple(rounds))


def read_eval_set(
    path: Path, image_root: Path | None = None, limit: int | None = None
) -> list[EvalTest]:
    """Parse an eval JSON file and find and decode its images (see the module docstring).

    A test that cannot run carries its `error`; DataError only for a file that is not an eval
    set at all.
    """
    try:
        data = read_json(path)  # the shared reader: a byte-order mark is accepted
    except OSError as err:
        raise DataError(f"cannot read eval set {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected an object mapping test name -> list of rounds")
    root = image_root if image_root is not None else path.parent
    found: dict[str, Any] = {}
    return [_locate(_parse_test(name, r), root, found) for name, r in list(data.items())[:limit]]


def require_runnable(tests: list[EvalTest], path: Path) -> None:
    """DataError (exit 2) if no test can run: the set, not one test, is wrong (or the root)."""
    failed = [t for t in tests if t.error is not None]
    if len(failed) < len(tests):
        return
    first = failed[0]
    others = f" ({len(failed) - 1} more test(s) cannot run either)" if len(failed) > 1 else ""
    hint = ""
    if any(t.reason == "image_missing" for t in failed):
        hint = "; set --image-root to the folder that holds the images (rule: dsvl eval --help)"
    raise DataError(f"{path}: no test can run{others}; test {first.name!r}: {first.error}{hint}")


# ---------------------------------------------------------------------- running


def _record(
    test: EvalTest,
    index: int | None,
    rnd: EvalRound | None,
    reply: Reply | None = None,
    error: str | None = None,
    status: str = OK,
) -> dict[str, Any]:
    """One round's JSONL record: the answer, or the status and error of a round not answered."""
    return {
        "test_name": test.name,
        "round": index,
        "question": rnd.question if rnd else "",
        "image_paths": list(rnd.images) if rnd else [],
        "image_files": [str(p) for p in rnd.paths] if rnd else [],
        "image_numbers": reply.image_numbers if reply else [],
        "answer": reply.text if reply else None,
        "finish_reason": reply.finish_reason if reply else None,
        "new_tokens": reply.new_tokens if reply else None,
        "dropped_rounds": reply.dropped_rounds if reply else 0,
        "status": status,
        "error": error,
    }


def _round_error(err: Exception, session: ChatSession) -> str:
    """One line for a failed round, with advice that fits eval (options, not chat commands)."""
    if isinstance(err, ContextOverflow):
        if session.overflow == "error":
            return f"{err.detail}; lower --max-new-tokens, or --overflow drop_oldest"
        return f"{err.detail}; the round alone does not fit: lower --max-new-tokens"
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return f"out of GPU memory: {str(err).splitlines()[0]}"
    return str(err)


def run_test(session: ChatSession, test: EvalTest) -> tuple[list[dict[str, Any]], str | None]:
    """The records of one test in a fresh conversation, and why it failed (None if it did not)."""
    if test.error is not None:
        error = f"not run: {test.error}"
        rounds = enumerate(test.rounds, 1)
        rows = [_record(test, i, r, error=error, status=NOT_RUN) for i, r in rounds]
        # A test whose rounds did not parse still gets its row: no failure is left out.
        return rows or [_record(test, None, None, error=error, status=NOT_RUN)], test.error
    session.clear()
    records = []
    for index, rnd in enumerate(test.rounds, 1):
        try:
            reply = session.ask(rnd.question, rnd.paths)
        except (DsvlError, torch.cuda.OutOfMemoryError) as err:
            error = _round_error(err, session)
            log.warning("test %r round %d failed: %s", test.name, index, error)
            records.append(_record(test, index, rnd, error=error, status=FAILED))
            later = enumerate(test.rounds[index:], index + 1)
            skipped = f"not run: round {index} failed"
            records += [_record(test, i, r, error=skipped, status=NOT_RUN) for i, r in later]
            return records, f"round {index}: {error}"
        records.append(_record(test, index, rnd, reply))
    return records, None


class ResultFiles:
    """`<stem>.csv` and `<stem>.jsonl` in `out`, appended test by test and flushed."""

    def __init__(self, out: Path, stem: str, common: dict[str, Any]) -> None:
        self.csv_path, self.jsonl_path = out / f"{stem}.csv", out / f"{stem}.jsonl"
        self.common = common
        try:
            out.mkdir(parents=True, exist_ok=True)
            self._csv = open(self.csv_path, "w", encoding="utf-8", newline="")  # noqa: SIM115
            self._jsonl = open(self.jsonl_path, "w", encoding="utf-8")  # noqa: SIM115
        except OSError as err:
            raise DataError(f"cannot write results in {out}: {err.strerror}") from None
        self._rows = csv.writer(self._csv)
        self._rows.writerow(CSV_COLUMNS)

    def write(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            images = " ".join(r["image_paths"])
            answer = r["answer"] or ""
            self._rows.writerow(
                [r["test_name"], images, r["question"], answer, r["status"], r["error"] or ""]
            )
            self._jsonl.write(json.dumps({**r, **self.common}, ensure_ascii=False) + "\n")
        self._csv.flush()
        self._jsonl.flush()

    def __enter__(self) -> ResultFiles:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._csv.close()
        self._jsonl.close()


def run_eval_set(
    session: ChatSession, tests: list[EvalTest], files: ResultFiles
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Run every test (see the module docstring); all records, and failed test -> reason."""
    records, failed = [], {}
    for number, test in enumerate(tests, 1):
        log.info("test %d/%d %r: %d round(s)", number, len(tests), test.name, len(test.rounds))
        rows, reason = run_test(session, test)
        if reason is not None:
            failed[test.name] = reason
            log.warning("test %r failed: %s", test.name, reason)
        files.write(rows)
        records += rows
    return records, failed


def summarise(
    records: list[dict[str, Any]], failed: dict[str, str], files: ResultFiles, console: Console
) -> dict[str, Any]:
    """Counts, failed tests with their reason, and the output files; printed and returned."""
    rounds = [r for r in records if r["round"] is not None]  # not the row of an unparsed test
    statuses = [r["status"] for r in rounds]
    summary: dict[str, Any] = {
        "tests": len({r["test_name"] for r in records}),
        "tests_failed": len(failed),
        "rounds": len(rounds),
        "answered": statuses.count(OK),
        "rounds_failed": statuses.count(FAILED),
        "rounds_not_run": statuses.count(NOT_RUN),
        "images": sum(len(r["image_paths"]) for r in records if r["status"] == OK),
        "cut_at_max_new_tokens": sum(r["finish_reason"] == "length" for r in records),
        "dropped_rounds": sum(r["dropped_rounds"] for r in records),
    }
    table = Table(title=f"eval {files.csv_path.stem}")
    table.add_column("item")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(
            key, str(value), style="bold red" if key == "tests_failed" and value else None
        )
    console.print(table)
    if failed:
        console.print(f"failed tests ({len(failed)}):", highlight=False)
        for name, reason in failed.items():
            console.print(f"  {name}: {reason}", highlight=False, soft_wrap=True)
    console.print(f"results: {files.csv_path}, {files.jsonl_path}", highlight=False, soft_wrap=True)
    return {
        **summary,
        "failed_tests": failed,
        "csv": str(files.csv_path),
        "jsonl": str(files.jsonl_path),
    }
