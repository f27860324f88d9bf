"""Training metrics: a JSONL log and TensorBoard scalars in the output dir (rank 0 only)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from dsvl_cli import dist
from dsvl_cli.log import get_logger

log = get_logger(__name__)


class MetricsWriter:
    """Append metrics to `metrics.jsonl` and, if enabled, TensorBoard (`tensorboard/`)."""

    def __init__(self, output_dir: Path, tensorboard: bool) -> None:
        self.enabled = dist.is_main()
        self.path = output_dir / "metrics.jsonl"
        self.tb = None
        if self.enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"))

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
