"""`dsvl eval`: the original's eval sets (multi-round, multi-image) and prepared held-out data.

Two kinds of `--data`, told apart by the file name:

* ``*.json``: the original DSVL's eval format (test name -> rounds), run test by test into
  ``<stem>.csv`` and ``<stem>.jsonl``, see `dsvl_cli.inference.eval_set`.
* ``*.jsonl``: prepared conversations (`dsvl prepare-data`): loss, perplexity and exact-match
  accuracy, see `dsvl_cli.inference.prepared` (reading) and `dsvl_cli.inference.scoring`.

Image paths in both follow one rule (`dsvl_cli.data.image_refs.locate_image`) under
``--image-root`` (default: the data file's folder). ``--limit N`` keeps the first N tests (eval
sets) or lines (prepared data).

A bad unit (a test; a prepared sample) fails alone: it is listed with its reason in every output
and the others are evaluated. The exit status tells a script what happened (`exit_code`):
0 every unit evaluated, 1 some failed (listed), 2 bad usage or input that stops everything
(nothing to evaluate, unreadable file, no model), raised as DsvlError before the model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from dsvl_cli import __version__
from dsvl_cli.errors import ConfigError, DataError
from dsvl_cli.inference.eval_set import (
    ResultFiles,
    read_eval_set,
    require_runnable,
    run_eval_set,
    summarise,
)
from dsvl_cli.inference.generation import GenerationSettings
from dsvl_cli.inference.session import OVERFLOW_MODES, ChatSession, Overflow
from dsvl_cli.log import get_logger

log = get_logger(__name__)

__all__ = ["EXIT_ALL_OK", "EXIT_SOME_FAILED", "exit_code", "read_eval_set", "run_eval"]

EXIT_ALL_OK = 0
EXIT_SOME_FAILED = 1  # (2, input that stops everything, is DsvlError.exit_code)


def exit_code(summary: dict[str, Any]) -> int:
    """The exit status for `run_eval`'s summary: 1 when a test or a sample failed, else 0."""
    failed = summary.get("tests_failed", 0) or summary.get("failures", 0)
    return EXIT_SOME_FAILED if failed else EXIT_ALL_OK


def _check_arguments(data: Path, limit: int | None, batch_size: int, overflow: str) -> None:
    """Usage errors, before anything is read or loaded."""
    if overflow not in OVERFLOW_MODES:
        raise ConfigError(f"--overflow {overflow!r}: choose one of {', '.join(OVERFLOW_MODES)}")
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {batch_size}")
    if not data.is_file():
        raise DataError(f"--data {data}: no such file")
    if data.suffix not in (".json", ".jsonl"):
        raise DataError(
            f"--data {data}: expected an eval set (.json, test name -> rounds) or prepared "
            "conversations (.jsonl from dsvl prepare-data)"
        )


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
    printed (eval sets: counts, failed tests and output files; prepared data: the metrics in
    metrics.json); `exit_code(summary)` is the status for the command.
    """
    from dsvl_cli.inference.loader import LoadedModel, load_for_inference

    console = console or Console(soft_wrap=True)
    settings = settings or GenerationSettings()
    _check_arguments(data, limit, batch_size, overflow)
    root = image_root if image_root is not None else data.parent

    def load() -> LoadedModel:
        return load_for_inference(model, device, dtype, device_map, base_lm, base_vision)

    if data.suffix == ".jsonl":
        from dsvl_cli.inference.prepared import read_prepared
        from dsvl_cli.inference.scoring import score_prepared

        prepared = read_prepared(data, root, limit)
        loaded = load()
        return score_prepared(
            loaded, data, prepared.conversations, root, out, batch_size, settings, console,
            failures=prepared.failures,
        )  # fmt: skip
    tests = read_eval_set(data, root, limit)
    require_runnable(tests, data)
    loaded = load()
    session = ChatSession.from_loaded(loaded, settings, overflow=overflow)
    common = {"model": str(model), "dsvl_version": __version__, "generation": settings.to_dict()}
    with ResultFiles(out, data.stem, common) as files:
        records, failed = run_eval_set(session, tests, files)
    return summarise(records, failed, files, console)
