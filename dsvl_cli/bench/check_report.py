"""The GPU check's report: one row per part, versions on top, as a table, JSON and plain text.

`gpu_check.json` holds everything (versions, every part's numbers, reason, log file, seconds);
`gpu_check.txt` is the printed table. Both are rewritten after every part, so a check that is
stopped part-way still leaves the parts it finished.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.table import Table

OK, FAILED, SKIPPED = "ok", "failed", "skipped"
Status = Literal["ok", "failed", "skipped"]
JSON_FILE = "gpu_check.json"
TEXT_FILE = "gpu_check.txt"
TEXT_WIDTH = 150
# The facts shown on top of the table, by their names in `dsvl env` (tools/env.py).
HEADLINE = (
    "Python",
    "torch",
    "torch CUDA build",
    "GPUs",
    "transformers",
    "deepspeed",
    "peft",
)
_STYLE = {OK: "green", FAILED: "bold red", SKIPPED: "yellow"}


@dataclass
class PartResult:
    """One row: a part of the check and how it went.

    Attributes:
        name: the row's name, e.g. "train ZeRO-2".
        status: ok, failed or skipped.
        seconds: wall time the part took (0 when skipped).
        summary: its key numbers in one line ("" when none).
        numbers: the same numbers (and more) for the JSON.
        reason: why it failed or was skipped.
        log: its log file, relative to the output folder.
    """

    name: str
    status: Status
    seconds: float = 0.0
    summary: str = ""
    numbers: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    log: str | None = None


@dataclass
class CheckReport:
    """The whole check: mode ("gpu" or "cpu-smoke"), versions, and the parts run so far."""

    mode: str
    versions: dict[str, str]
    budget_s: float
    parts: list[PartResult] = field(default_factory=list)
    total_s: float = 0.0

    @property
    def failed(self) -> list[PartResult]:
        return [p for p in self.parts if p.status == FAILED]


def collect_versions() -> dict[str, str]:
    """`dsvl env`'s facts (dsvl, Python, packages, CUDA build, GPUs, ...)."""
    from dsvl_cli.tools.env import collect_env

    return collect_env()


def headline(versions: dict[str, str]) -> str:
    """`Python 3.12.3 | torch 2.11.0 | ...` from the HEADLINE facts that are known."""
    return " | ".join(f"{key} {versions[key]}" for key in HEADLINE if key in versions)


def table(report: CheckReport) -> Table:
    """The report as a rich table: part, status, key numbers (or the reason), seconds."""
    title = f"dsvl GPU check ({report.mode}): {headline(report.versions)}"
    out = Table(title=title, title_justify="left", show_lines=True)
    out.add_column("part", no_wrap=True)
    out.add_column("status", no_wrap=True)
    out.add_column("key numbers")
    out.add_column("s", justify="right", no_wrap=True)
    for part in report.parts:
        detail = part.summary
        if part.reason:
            detail = f"{detail}\n{part.reason}" if detail else part.reason
        style = _STYLE[part.status]
        status = f"[{style}]{part.status}[/]"
        out.add_row(part.name, status, detail or "-", f"{part.seconds:.0f}")
    done = len(report.parts) - len(report.failed)
    out.caption = f"{done}/{len(report.parts)} parts not failed, {report.total_s:.0f} s in all"
    return out


def render_text(report: CheckReport) -> str:
    """The table as plain text (no colour), TEXT_WIDTH characters wide."""
    buffer = io.StringIO()
    Console(file=buffer, width=TEXT_WIDTH, no_color=True, highlight=False).print(table(report))
    return buffer.getvalue()


def write_report(report: CheckReport, out_dir: Path) -> None:
    """Write gpu_check.json and gpu_check.txt into `out_dir` (each replaced atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "mode": report.mode,
        "versions": report.versions,
        "budget_s": report.budget_s,
        "total_s": round(report.total_s, 1),
        "parts": [asdict(p) for p in report.parts],
    }
    texts = {
        JSON_FILE: json.dumps(payload, indent=2, default=str) + "\n",
        TEXT_FILE: render_text(report),
    }
    for name, text in texts.items():
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out_dir / name)
