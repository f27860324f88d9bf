"""Training progress on rank 0: a live rich bar on a terminal, plain lines everywhere else.

When stderr is not a terminal (nohup, SLURM, `> log.txt 2>&1`) a live bar would print nothing
until the end, so every `train.log_every` steps (and at the last step) one plain line goes out:

    step 20/450  epoch 1/10  loss 2.3456  lr 2.00e-03  1,234 tok/s  elapsed 0:00:41  ETA 0:14:38
"""

from __future__ import annotations

import time
from datetime import timedelta
from types import TracebackType

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dsvl_cli import dist
from dsvl_cli.log import console


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=max(0, round(seconds))))


class TrainProgress:
    """Step, epoch, loss, lr, tokens/s and ETA of a run; silent on ranks other than 0."""

    def __init__(self, total: int, epochs: int, start: int = 0, log_every: int = 10) -> None:
        self.total, self.epochs, self.start, self.log_every = total, epochs, start, log_every
        self.enabled = dist.is_main()
        self.live = self.enabled and console.is_terminal
        self.began = time.monotonic()
        self.window_tokens, self.window_seconds = 0, 0.0
        self.progress = Progress(
            TextColumn("[bold]train[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            console=console,
            disable=not self.live,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, status="")

    def __enter__(self) -> TrainProgress:
        self.began = time.monotonic()
        if self.live:  # a disabled rich Progress still prints a blank line on stop (rich 13)
            self.progress.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self.live:
            self.progress.stop()

    def update(
        self, step: int, epoch: int, loss: float, lr: float, tokens: int, seconds: float
    ) -> None:
        """Record one optimiser step: `tokens` input tokens processed in `seconds`."""
        self.window_tokens += tokens
        self.window_seconds += seconds
        status = f"epoch {epoch + 1}/{self.epochs}  loss {loss:.4f}  lr {lr:.2e}"
        if self.live:
            rate = tokens / max(seconds, 1e-9)
            self.progress.update(self.task, completed=step, status=f"{status}  {rate:,.0f} tok/s")
        elif self.enabled and (step % self.log_every == 0 or step >= self.total):
            console.print(self.line(step, status), markup=False, highlight=False, soft_wrap=True)

    def line(self, step: int, status: str) -> str:
        """The plain progress line; tokens/s averages the steps since the previous line."""
        rate = self.window_tokens / max(self.window_seconds, 1e-9)
        self.window_tokens, self.window_seconds = 0, 0.0
        elapsed = time.monotonic() - self.began
        done = step - self.start
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        return (
            f"step {step}/{self.total}  {status}  {rate:,.0f} tok/s  "
            f"elapsed {_clock(elapsed)}  ETA {_clock(eta)}"
        )
