"""The training progress bar: step, epoch, loss, lr, tokens/s and ETA (rank 0 only)."""

from __future__ import annotations

from types import TracebackType

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dsvl_cli import dist
from dsvl_cli.log import console


class TrainProgress:
    """A rich progress bar over optimiser steps; silent on ranks other than 0."""

    def __init__(self, total: int, epochs: int, start: int = 0) -> None:
        self.epochs = epochs
        self.enabled = dist.is_main()
        self.progress = Progress(
            TextColumn("[bold]train[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            console=console,
            disable=not self.enabled,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, status="")

    def __enter__(self) -> TrainProgress:
        self.progress.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.progress.stop()

    def update(self, step: int, epoch: int, loss: float, lr: float, tokens_per_s: float) -> None:
        status = (
            f"epoch {epoch + 1}/{self.epochs}  loss {loss:.4f}  lr {lr:.2e}  "
            f"{tokens_per_s:,.0f} tok/s"
        )
        self.progress.update(self.task, completed=step, status=status)
