"""Training metrics: a JSONL log and TensorBoard scalars in the output dir (rank 0 only).

After a resume from step N every series continues from N: records of later steps (written before
the crash, after the checkpoint) are dropped from `metrics.jsonl`, TensorBoard purges its events
from step N + 1 on, and a record for a step its series already has (an eval the resumed run
repeats) is not written again, so each series' steps strictly increase. A fresh start drops what
an earlier, unfinished attempt wrote. A non-finite value is written as JSON `null` (and not to
TensorBoard), never as a number.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from dsvl_cli import dist
from dsvl_cli.log import get_logger

log = get_logger(__name__)


class MetricsWriter:
    """Append metrics to `metrics.jsonl` and, if enabled, TensorBoard (`tensorboard/`).

    Args:
        output_dir: the run folder.
        tensorboard: also write TensorBoard event files.
        resume_step: the step training continues from; None for a fresh start.
    """

    def __init__(self, output_dir: Path, tensorboard: bool, resume_step: int | None) -> None:
        self.enabled = dist.is_main()
        self.path = output_dir / "metrics.jsonl"
        self.tb = None
        self.last: dict[str, int] = {}  # series ("train", "eval", ...) -> its latest step
        if not self.enabled:
            return
        self._truncate_after(-1 if resume_step is None else resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = 0 if resume_step is None else resume_step + 1
            self.tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=purge)

    def _truncate_after(self, step: int) -> None:
        """Keep only the records up to `step`, and note each series' latest step."""
        if not self.path.exists():
            return
        lines = [line for line in self.path.read_text(encoding="utf-8").splitlines() if line]
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        for line in kept:
            record = json.loads(line)
            for series in _series(record):
                self.last[series] = max(self.last.get(series, -1), record["step"])
        if len(kept) == len(lines):
            return
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        log.info("metrics.jsonl: dropped %d record(s) after step %d", len(lines) - len(kept), step)

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _finite_or_none(v) for k, v in values.items()}
        series = _series(clean)
        if any(self.last.get(name, -1) >= step for name in series):
            return  # this series already has this step (a resumed run repeating an eval)
        self.last.update(dict.fromkeys(series, step))
        record = {"step": step, "time": round(time.time(), 3), **clean}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in clean.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _series(record: dict[str, Any]) -> set[str]:
    """The series a record belongs to: the prefixes of its "series/name" keys."""
    return {key.split("/", 1)[0] for key in record if "/" in key}


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
