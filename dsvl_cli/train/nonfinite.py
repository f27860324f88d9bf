"""Non-finite numbers in training: a loss, a gradient norm or a parameter that is NaN or inf.

Nothing non-finite is logged as a number, exported, or ends in exit 0:

* a micro-batch whose loss is non-finite on any rank is, per `train.on_nonfinite`, the end of the
  run (`stop`) or dropped on every rank (`skip`: a zero-loss placeholder keeps the ranks' backward
  and step sequence identical); a step whose every micro-batch was dropped applies no update (its
  learning rate is 0), and `train.max_nonfinite_steps` such steps in a row end the run;
* a non-finite gradient norm or parameter after an optimiser step cannot be undone: the run ends
  with the step, the learning rate and the way out;
* a non-finite eval loss ends the run (the model gives non-finite outputs).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn.utils import get_total_norm

from dsvl_cli import dist
from dsvl_cli.errors import DsvlError
from dsvl_cli.log import get_logger

log = get_logger(__name__)

CAUSE = (
    "likely cause: the learning rate is too high for this model (lower optim.lr, add warmup), "
    "or fp16 overflow (use distributed.precision=bf16 or fp32)"
)


class TrainingError(DsvlError):
    """Training cannot go on (non-finite numbers, too many bad samples)."""


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true on at least one rank (every rank must call it)."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(dist.all_reduce_max(value).item() > 0)


class NonFiniteGuard:
    """Applies `train.on_nonfinite` and counts what was skipped (`state_dict` for resume)."""

    def __init__(self, mode: str, max_steps_in_row: int) -> None:
        self.mode, self.max_steps_in_row = mode, max_steps_in_row
        self.skipped_batches = 0
        self.skipped_steps = 0
        self.in_row = 0

    def bad_loss(self, step: int, sample_ids: list[str], last_checkpoint: str | None) -> None:
        """A micro-batch of `step` gave a non-finite loss: stop, or count it as skipped."""
        where = f"non-finite loss at step {step} (samples: {', '.join(sample_ids[:4]) or '-'})"
        if self.mode == "stop":
            raise TrainingError(f"{where}; {CAUSE}; {_resume_hint(last_checkpoint)}")
        self.skipped_batches += 1
        log.warning("%s: micro-batch skipped (train.on_nonfinite=skip)", where)

    def end_step(self, step: int, all_skipped: bool, last_checkpoint: str | None) -> None:
        """Count a step whose micro-batches were all skipped; stop after too many in a row."""
        self.in_row = self.in_row + 1 if all_skipped else 0
        self.skipped_steps += int(all_skipped)
        if self.in_row >= self.max_steps_in_row:
            raise TrainingError(
                f"{self.in_row} steps in a row up to step {step} gave only non-finite losses "
                f"(train.max_nonfinite_steps={self.max_steps_in_row}); {CAUSE}; "
                f"{_resume_hint(last_checkpoint)}"
            )

    def state_dict(self) -> dict[str, int]:
        return {
            "skipped_batches": self.skipped_batches,
            "skipped_steps": self.skipped_steps,
            "in_row": self.in_row,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_batches = int(state.get("skipped_batches", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.in_row = int(state.get("in_row", 0))


@contextlib.contextmanager
def no_update(optimizer: Any, active: bool) -> Iterator[None]:
    """Within the block every param group's lr is 0 (when `active`): the step changes no weight.

    The learning-rate schedule still advances: the scheduler, stepped inside the engine's step,
    writes the next lr itself; a group it did not touch gets its lr back.
    """
    if not active:
        yield
        return
    saved = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, saved, strict=True):
            if group["lr"] == 0.0:
                group["lr"] = lr


def count_nonfinite(tensors: list[torch.Tensor]) -> int:
    """How many of `tensors` hold a NaN or inf.

    The common case (none) costs one max-abs norm over all tensors and one host sync (NaN and
    inf both propagate to it) instead of a check and a sync per tensor; only a bad verdict
    counts one by one.
    """
    if not tensors:
        return 0
    if bool(torch.isfinite(get_total_norm(tensors, math.inf))):
        return 0
    return sum(int(not torch.isfinite(t).all()) for t in tensors)


def check_after_step(
    engine: Any, step: int, lr: float, device: torch.device, last_checkpoint: str | None
) -> float:
    """Raise TrainingError if the step left a non-finite gradient norm or trainable parameter.

    Returns the global gradient norm DeepSpeed computed (NaN when it computed none, e.g. ZeRO-0
    without clipping). Under ZeRO-3 each rank checks its own partition (`ds_tensor`); the verdict
    is taken over ranks.
    """
    raw = engine.get_global_grad_norm()
    norm = math.nan if raw is None else float(raw)
    params = [getattr(p, "ds_tensor", p) for p in engine.module.parameters() if p.requires_grad]
    bad = count_nonfinite([p.detach() for p in params if p.numel()])
    norm_bad = raw is not None and not math.isfinite(norm)
    counts = torch.tensor([float(bad), float(norm_bad)], device=device)
    dist.all_reduce_max(counts)  # ZeRO-0/1/2 ranks hold the same copy: max, not sum
    if counts.sum() > 0:
        raise TrainingError(
            f"optimizer step {step} (lr {lr:.3g}, gradient norm {norm:.4g}) left "
            f"{int(counts[0])} trainable tensor(s) non-finite; {CAUSE}; "
            f"{_resume_hint(last_checkpoint)}"
        )
    return norm


def check_eval(loss: float, step: int, last_checkpoint: str | None) -> None:
    """Raise TrainingError when the eval loss is not a finite number."""
    if not math.isfinite(loss):
        raise TrainingError(
            f"eval loss at step {step} is {loss}: the model gives non-finite outputs; {CAUSE}; "
            f"{_resume_hint(last_checkpoint)}"
        )


def _resume_hint(last_checkpoint: str | None) -> str:
    if last_checkpoint is None:
        return "nothing was exported from the broken state"
    return f"nothing was exported from the broken state; resume with train.resume={last_checkpoint}"
