"""The run folder (`train.output_dir`): never retrain a finished run by accident.

A run is finished once `final/meta.json` exists. Training into such a folder again would retrain,
replace `best/` and `final/`, and append a second series to `metrics.jsonl`, so it is refused,
except:

* `train.overwrite: true` deletes what an earlier run wrote there (checkpoints, exports, metrics)
  and trains from step 0; without the delete, `train.resume: auto` could later pick up a stale
  checkpoint of the old run;
* `train.resume: <checkpoints/step-N>` (an explicit checkpoint) continues from it; at the run's
  last step nothing is retrained.

An interrupted run (no `final/`) is resumed by `train.resume: auto` as before. An export a kill
interrupted while it was being replaced (`.NAME.tmp` / `.NAME.old` left, see `dsvl_cli.atomic`) is
put back by `restore_exports`, which the trainer runs (through `checkpoint.repair_exports`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from dsvl_cli.atomic import recover_dir
from dsvl_cli.config import TrainConfig
from dsvl_cli.errors import ConfigError
from dsvl_cli.log import get_logger
from dsvl_cli.model.manifest import MODEL_FOLDER_FILES, folder_problem

log = get_logger(__name__)

STEP_DIR = re.compile(r"^step-(\d+)$")
FINISHED_MARK = Path("final") / "meta.json"
# What a training run writes into output_dir (exports being replaced: `.<name>.tmp` / `.old`).
_RUN_FOLDERS = re.compile(r"^\.?(checkpoints|best|final|tensorboard|epoch-\d+)(\.tmp|\.old)?$")
_EXPORT_NAMES = re.compile(r"^\.?(best|final|epoch-\d+)(\.tmp|\.old)?$")
_RUN_FILES = ("metrics.jsonl", "blend.json", "config.yaml")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete `step-N` folders (with their trainer_state.json), oldest first."""
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := STEP_DIR.match(p.name)) and (p / "trainer_state.json").is_file()
    ]
    return [p for _, p in sorted(found)]


def finished_step(output_dir: Path) -> int | None:
    """The step a finished run in `output_dir` ended at (-1 if unknown), or None if none is."""
    mark = output_dir / FINISHED_MARK
    if not mark.is_file():
        return None
    try:
        return int(json.loads(mark.read_text(encoding="utf-8")).get("step", -1))
    except (ValueError, TypeError, AttributeError):
        return -1


def _refusal(out: Path, step: int) -> str:
    at = f" at step {step}" if step >= 0 else ""
    found = complete_checkpoints(checkpoints_dir(out))
    more = (
        f"; to train it further, raise train.epochs or train.max_steps and set "
        f"train.resume={found[-1]}"
        if found
        else ""
    )
    return (
        f"train.output_dir={out} holds a finished run (final/{at}); set a new "
        f"train.output_dir, or train.overwrite=true to train again from scratch and replace it"
        f"{more}"
    )


def clear_run(output_dir: Path) -> list[str]:
    """Delete what an earlier training run wrote into `output_dir`; returns the names removed."""
    if not output_dir.is_dir():
        return []
    removed = []
    for path in sorted(output_dir.iterdir()):
        if path.is_dir() and _RUN_FOLDERS.match(path.name):
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file() and path.name in _RUN_FILES:
            path.unlink(missing_ok=True)
        else:
            continue
        removed.append(path.name)
    return removed


def export_complete(folder: Path) -> bool:
    """True when the export's manifest checks out (without one: its three core files exist)."""
    return folder_problem(folder, MODEL_FOLDER_FILES) is None


def restore_exports(output_dir: str | Path) -> list[str]:
    """Put back exports a kill left half-replaced; returns the names still missing or incomplete.

    Every export with a leftover (`best`, `final`, `epoch-K`) is checked: a complete `NAME` loses
    the leftovers; otherwise a complete `.NAME.tmp`, else `.NAME.old`, becomes `NAME`. Main
    process only (it renames and deletes), before the run writes any export.
    """
    out = Path(output_dir)
    if not out.is_dir():
        return []
    names = {m.group(1) for p in out.iterdir() if p.is_dir() and (m := _EXPORT_NAMES.match(p.name))}
    broken = []
    for name in sorted(names):
        if done := recover_dir(out / name, export_complete):
            log.warning("%s (a kill interrupted the export)", done)
        if not export_complete(out / name):
            broken.append(name)
    return broken


def refuse_finished_run(train: TrainConfig) -> None:
    """ConfigError if output_dir holds a finished run and the config neither overwrites it nor
    names a checkpoint to continue from. Cheap: no torch import, so the CLI calls it first."""
    out = Path(train.output_dir)
    step = finished_step(out)
    if step is None or train.overwrite or train.resume not in ("auto", "never"):
        return
    raise ConfigError(_refusal(out, step))


def prepare_run_dir(train: TrainConfig) -> None:
    """Refuse a finished run, or clear the folder for train.overwrite=true.

    Called by every rank before anything slow; only each node's local rank 0 deletes.
    """
    refuse_finished_run(train)
    if train.overwrite and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        out = Path(train.output_dir)
        if removed := clear_run(out):
            log.info("train.overwrite=true: removed %s from %s", ", ".join(removed), out)
