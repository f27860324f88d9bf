"""Resumable training state in `output_dir/checkpoints/step-N/`, written atomically.

Layout of one checkpoint:

    step-N/state/...          DeepSpeed engine state (module, optimiser, scheduler, ZeRO shards)
    step-N/trainer_state.json step, epoch, batches done in the epoch, best eval loss, skip counts
    step-N/rng-rank{r}.pt     RNG states of python / numpy / torch / CUDA for rank r (python's
                              and numpy's as JSON strings, so the file is plain tensors + str)
    step-N/manifest.json      every other file's size (and small files' sha256), written last

Every rank writes into `checkpoints/.tmp-step-N`; after a barrier rank 0 writes the manifest,
fsyncs the folder and swaps it in as `step-N` (`dsvl_cli.atomic`), so a crash mid-save leaves
only a `.tmp-*` folder, which is never resumed from. The last `train.keep_last` checkpoints are
kept. On resume the manifest is checked (a checkpoint missing a file or with a short one is
refused in one line, or skipped by `train.resume=auto`), and every file is read with
`torch.load(weights_only=True)` (`safe_load.py`): a crafted file cannot run code.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsvl_cli import dist
from dsvl_cli.atomic import replace_dir
from dsvl_cli.errors import CheckpointError
from dsvl_cli.log import get_logger
from dsvl_cli.model.manifest import has_manifest, manifest_problem, require_complete, write_manifest
from dsvl_cli.train.run_dir import checkpoints_dir, complete_checkpoints, restore_exports
from dsvl_cli.train.safe_load import DAMAGED_FIX, deepspeed_reads_safely, safe_load

log = get_logger(__name__)
ENGINE_TAG = "state"
STATE_FILE = "trainer_state.json"
# What DeepSpeed raises for a checkpoint it cannot read (missing files are AssertionErrors).
_LOAD_ERRORS = (AssertionError, KeyError, OSError, RuntimeError, ValueError, EOFError)


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
    dist.barrier()
    if dist.is_main():
        # Once every rank's files are written: the state file, the manifest last, then the
        # atomic step (only complete checkpoints get a step-N name). One process renames, so
        # nodes sharing the filesystem never race each other over the same folder.
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2), "utf-8")
        write_manifest(tmp)
        replace_dir(tmp, final)
    dist.barrier()
    if dist.is_main():
        _rotate(root, keep_last)
    return final


def _rotate(root: Path, keep_last: int) -> None:
    for old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def find_resume(output_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from: `auto` = newest complete one, `never`, or a path.

    A path must be a complete checkpoint (CheckpointError naming its first missing or short
    file otherwise); `auto` skips incomplete ones with a warning.
    """
    if resume == "never":
        return None
    if resume == "auto":
        for path in reversed(complete_checkpoints(checkpoints_dir(output_dir))):
            if not has_manifest(path) or not (problem := manifest_problem(path)):
                return path
            log.warning("not resuming from %s: it is incomplete (%s)", path, problem)
        return None
    path = Path(resume)
    if not has_manifest(path) and not (path / STATE_FILE).is_file():
        raise CheckpointError(
            f"train.resume={resume}: not a complete dsvl checkpoint (no {STATE_FILE}); "
            "use auto, never, or a checkpoints/step-N folder"
        )
    require_complete(path, (STATE_FILE,), f"train.resume={resume} cannot be used; {DAMAGED_FIX}")
    return path


def load_checkpoint(engine: Any, path: Path) -> TrainState:
    """Restore engine, RNG and trainer state from a `step-N` folder (every file weights-only).

    Raises CheckpointError in one line for a file DeepSpeed cannot read or that holds anything
    but tensors, plain containers and DeepSpeed's own checkpoint types.
    """
    from deepspeed.runtime.zero.utils import ZeRORuntimeException  # e.g. another world size

    try:
        with deepspeed_reads_safely():
            load_path, _ = engine.load_checkpoint(str(path), tag=ENGINE_TAG)
    except (*_LOAD_ERRORS, ZeRORuntimeException) as err:
        raise CheckpointError(
            f"{path}: DeepSpeed cannot load it ({type(err).__name__}: {_one_line(err)}); it is "
            f"incomplete or from another model or world size; {DAMAGED_FIX}"
        ) from None
    if load_path is None:
        raise CheckpointError(f"{path}: DeepSpeed found no engine state under {ENGINE_TAG}/")
    rng_file = path / f"rng-rank{dist.rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(safe_load(rng_file))
    else:
        log.warning("%s has no RNG state for rank %d (world size changed?)", path, dist.rank())
    data = json.loads((path / STATE_FILE).read_text("utf-8"))
    return TrainState(**data)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text[:200] + "...") if len(text) > 200 else (text or "no message")


def repair_exports(output_dir: str | Path, state: TrainState) -> list[str]:
    """Restore exports a kill left half-replaced; collective (every rank calls it once).

    Rank 0 puts back `best/`, `final/`, `epoch-K/` from a complete `.NAME.tmp` / `.NAME.old`
    (`run_dir.restore_exports`); every rank gets the names still missing or incomplete. When
    `best/` is one of them, `state.best_eval_loss` is cleared so the next evaluation exports it
    again. Call it after the checkpoint is loaded and before anything is exported.
    """
    broken = restore_exports(output_dir) if dist.is_main() else []
    broken = dist.gather_objects(broken)[0]
    for name in broken:
        log.warning("%s/%s is incomplete and has no complete copy to restore", output_dir, name)
    if "best" in broken and state.best_eval_loss is not None:
        log.warning("best/ will be exported again at the next evaluation")
        state.best_eval_loss = None
    return broken
