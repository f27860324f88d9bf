"""Finding a model folder when none is given: the newest export under ./outputs.

`dsvl chat`, `dsvl eval` and `dsvl fuse-lora` take the model folder as an optional argument.
Without one they use the newest dsvl model folder under `outputs/` (the default `train.output_dir`
parent): any folder with a config.yaml and a meta.json whose "format" is accepted ("dsvl-export"
for `final/`, `best/`, `epoch-K/`; "dsvl-fused" for a `dsvl fuse-lora` result), newest by the
meta.json modification time. The choice is logged (stderr), so stdout keeps only results.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from dsvl_cli.errors import CheckpointError
from dsvl_cli.log import get_logger

log = get_logger(__name__)

# The meta.json "format" values dsvl writes; repeated here (not imported from the module that
# writes folders) so finding a folder needs no torch import.
EXPORT_FORMAT = "dsvl-export"
FUSED_FORMAT = "dsvl-fused"
MODEL_FORMATS = (EXPORT_FORMAT, FUSED_FORMAT)
DEFAULT_ROOT = Path("outputs")


def _format(meta_file: Path) -> str | None:
    """The folder's meta.json "format", or None for anything unreadable or not a model folder."""
    if not (meta_file.parent / "config.yaml").is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta.get("format") if isinstance(meta, dict) else None


def model_folders(root: Path, formats: Iterable[str] = MODEL_FORMATS) -> list[Path]:
    """Every model folder of an accepted format under `root`, oldest first.

    Hidden folders (an export being written is `.NAME.tmp`) are skipped.
    """
    accepted = set(formats)
    found: list[tuple[int, str, Path]] = []
    for meta_file in Path(root).rglob("meta.json"):
        rel = meta_file.relative_to(root).parts
        if any(part.startswith(".") for part in rel) or _format(meta_file) not in accepted:
            continue
        found.append((meta_file.stat().st_mtime_ns, str(meta_file.parent), meta_file.parent))
    return [folder for _, _, folder in sorted(found)]


def find_newest_model(root: Path = DEFAULT_ROOT, formats: Iterable[str] = MODEL_FORMATS) -> Path:
    """The newest model folder under `root`.

    Raises:
        CheckpointError: none there; the message says how to pass or make one.
    """
    folders = model_folders(root, formats) if Path(root).is_dir() else []
    if not folders:
        kinds = "export" if set(formats) == {EXPORT_FORMAT} else "export or fused model"
        raise CheckpointError(
            f"no model folder given and no {kinds} under {root}/; pass one "
            f"(e.g. {root}/run/final), or train one first: dsvl train tiny"
        )
    return folders[-1]


def model_or_newest(
    given: Path | None, root: Path = DEFAULT_ROOT, formats: Iterable[str] = MODEL_FORMATS
) -> Path:
    """`given` when set; otherwise the newest model folder under `root`, logged as the choice."""
    if given is not None:
        return given
    folder = find_newest_model(root, formats)
    log.info("no model folder given; using the newest under %s: %s", root, folder)
    return folder
