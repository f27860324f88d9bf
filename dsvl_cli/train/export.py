"""Writing model exports (`epoch-K/`, `best/`, `final/`) from a training run.

The folder format and its reader live in `dsvl_cli.model.folder`; this module adds what training
needs around it: under ZeRO-3 the trainable parameters are gathered on every rank; every rank
refuses non-finite weights (so all fail together); rank 0 writes the folder beside its final
place and swaps it in (`dsvl_cli.atomic`: a kill at any moment leaves a complete copy, and
`checkpoint.repair_exports` restores it on resume).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dsvl_cli.atomic import fresh_tmp, replace_dir
from dsvl_cli.config import Config
from dsvl_cli.model.builder import Built
from dsvl_cli.model.finite import refuse_nonfinite
from dsvl_cli.model.folder import write_export_folder
from dsvl_cli.model.vlm import VisualChatModel


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def gathered_trainable_state(model: VisualChatModel) -> dict[str, torch.Tensor]:
    """Full CPU copies of every trainable parameter (ZeRO-3 partitions gathered on all ranks)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    partitioned = [p for _, p in named if hasattr(p, "ds_id")]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
            return {n: p.detach().cpu().clone() for n, p in named}
    return {n: p.detach().cpu().clone() for n, p in named}


def export_model(
    model: VisualChatModel, built: Built, config: Config, out: Path, meta: dict[str, Any]
) -> Path | None:
    """Write an export folder atomically (rank 0); every rank must call it under ZeRO-3.

    `model` is the trained module (the engine's under DeepSpeed, sharing `built.model`'s
    structure); base paths in `config` that are relative are read against the current directory.
    Returns `out` on rank 0, None elsewhere. Raises CheckpointError (on every rank, before any
    file is written) when a tensor is NaN or Inf.
    """
    state = gathered_trainable_state(model)
    refuse_nonfinite(state.items(), out)
    if not _is_main():
        return None
    tmp = fresh_tmp(out)
    write_export_folder(tmp, model, built, config, state, meta)
    replace_dir(tmp, out)
    return out
