"""Resumable training state in `output_dir/checkpoints/step-N/`, written atomically.

Layout of one checkpoint:

    step-N/state/...          DeepSpeed engine state (module, optimiser, scheduler, ZeRO shards)
    step-N/trainer_state.json step, epoch, batches done in the epoch, best eval loss, skip counts
    step-N/rng-rank{r}.pt     RNG states of python / numpy / torch / CUDA for rank r

Every rank writes into `checkpoints/.tmp-step-N`; after a barrier it is renamed to `step-N`,
so a crash mid-save leaves only a `.tmp-*` folder, which is never resumed from. The last
`train.keep_last` checkpoints are kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsvl_cli import dist
from dsvl_cli.errors import CheckpointError
from dsvl_cli.log import get_logger
from dsvl_cli.train.run_dir import checkpoints_dir, complete_checkpoints

log = get_logger(__name__)
ENGINE_TAG = "state"


@dataclass
class TrainState:
    """Where training stands; saved with every checkpoint."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    best_eval_loss: float | None = None
    skips: dict[str, Any] = field(default_factory=dict)
    nonfinite: dict[str, Any] = field(default_factory=dict)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps(_numpy_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> list[Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]


def _json_to_tuple(value: Any) -> Any:
    return tuple(_json_to_tuple(v) for v in value) if isinstance(value, list) else value


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_json_to_tuple(json.loads(state["python"])))
    name, keys, pos, has_gauss, gauss = json.loads(state["numpy"])
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine: Any, state: TrainState, output_dir: str | Path, keep_last: int) -> Path:
    """Save engine + trainer state to `checkpoints/step-N` (all ranks call this)."""
    root = checkpoints_dir(output_dir)
    final = root / f"step-{state.step}"
    tmp = root / f".tmp-step-{state.step}"
    if dist.local_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, save_latest=False)
    torch.save(_rng_state(), tmp / f"rng-rank{dist.rank()}.pt")
    if dist.is_main():
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2), "utf-8")
    dist.barrier()
    if dist.local_rank() == 0 and tmp.exists():
        shutil.rmtree(final, ignore_errors=True)
        # The atomic step: only complete checkpoints get a step-N name. On a shared filesystem
        # another node's local rank 0 may have renamed it already.
        with contextlib.suppress(FileNotFoundError):
            os.replace(tmp, final)
    dist.barrier()
    if dist.is_main():
        _rotate(root, keep_last)
    return final


def _rotate(root: Path, keep_last: int) -> None:
    for old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def find_resume(output_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from: `auto` = newest complete one, `never`, or a path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(checkpoints_dir(output_dir))
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise CheckpointError(
            f"train.resume={resume}: not a complete dsvl checkpoint (no trainer_state.json); "
            "use auto, never, or a checkpoints/step-N folder"
        )
    return path


def load_checkpoint(engine: Any, path: Path) -> TrainState:
    """Restore engine, RNG and trainer state from a `step-N` folder."""
    load_path, _ = engine.load_checkpoint(str(path), tag=ENGINE_TAG)
    if load_path is None:
        raise CheckpointError(f"{path}: DeepSpeed found no engine state under {ENGINE_TAG}/")
    rng_file = path / f"rng-rank{dist.rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        log.warning("%s has no RNG state for rank %d (world size changed?)", path, dist.rank())
    data = json.loads((path / "trainer_state.json").read_text("utf-8"))
    return TrainState(**data)
