"""No model folder is written with NaN or Inf weights.

A diverged run has non-finite weights; written out, they would load and generate garbage (or
nothing) with exit 0. Writers call `refuse_nonfinite` on what they are about to write, before they
create any file, so the refusal leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from dsvl_cli.errors import CheckpointError

# Checked in slices so a multi-GB embedding table needs no full-size boolean copy.
_SLICE = 2**24
CAUSE = (
    "likely cause: training diverged (non-finite loss or weights); lower optim.lr (or add "
    "warmup; with fp16 use distributed.precision=bf16 or fp32) and train again from an earlier "
    "checkpoint"
)


def is_finite(tensor: torch.Tensor) -> bool:
    """True when every element is finite (integer and bool tensors always are)."""
    if tensor.is_meta or not (tensor.is_floating_point() or tensor.is_complex()):
        return True
    flat = tensor.detach().reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(_SLICE))


def refuse_nonfinite(tensors: Iterable[tuple[str, torch.Tensor]], target: Path) -> None:
    """CheckpointError naming the first tensor with a NaN or Inf (and how many tensors have one)."""
    bad = [(name, tensor) for name, tensor in tensors if not is_finite(tensor)]
    if not bad:
        return
    name, tensor = bad[0]
    count = int((~torch.isfinite(tensor.detach())).sum())
    more = f" ({len(bad)} tensors are non-finite)" if len(bad) > 1 else ""
    raise CheckpointError(
        f"refusing to write {target}: tensor {name} holds {count} NaN/Inf value(s){more}; {CAUSE}"
    )
