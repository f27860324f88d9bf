"""Logging set-up: rich console handler, messages from global rank 0 only by default."""

from __future__ import annotations

import logging
import os

from rich.console import Console
from rich.logging import RichHandler

console = Console(stderr=True)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class _RankZeroFilter(logging.Filter):
    """Drop records on ranks other than 0 unless `extra={"all_ranks": True}` keeps them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _rank() == 0 or getattr(record, "all_ranks", False)


def setup_logging(level: str | int = "INFO") -> None:
    """Install one rich handler on the `dsvl_cli` logger (idempotent)."""
    logger = logging.getLogger("dsvl_cli")
    logger.setLevel(level)
    if any(isinstance(h, RichHandler) for h in logger.handlers):
        return
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False, markup=False)
    handler.addFilter(_RankZeroFilter())
    logger.addHandler(handler)
    logger.propagate = False


def get_logger(name: str) -> logging.Logger:
    """Return a module logger under the `dsvl_cli` namespace."""
    return logging.getLogger(name if name.startswith("dsvl_cli") else f"dsvl_cli.{name}")
