"""Before training: are the recipe's base models and prepared data on this machine?

`check_inputs` names, in one line, every model folder and prepared file the config points at that
is missing, and how to get each: the download / extract command from the recipe's header comments
where one mentions the missing path, and the `dsvl prepare-data` command for the data. It runs
before any heavy import, so a machine without a 70B checkpoint learns that in a second.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from dsvl_cli.config import Config
from dsvl_cli.data.blend import source_path
from dsvl_cli.errors import DsvlError
from dsvl_cli.log import get_logger

log = get_logger(__name__)

_OUTPUT_FLAGS = ("--local-dir", "--out")


class MissingInputsError(DsvlError):
    """The recipe's base models or prepared data are not on this machine."""


def missing_models(config: Config) -> list[tuple[str, Path]]:
    """(config key, path) of every base model folder or weights file that does not exist."""
    vision = config.model.vision
    vision_ok = Path(vision.path).is_file() if vision.kind == "open_clip" else None
    missing = []
    if not Path(config.model.language_model).is_dir():
        missing.append(("model.language_model", Path(config.model.language_model)))
    if not (vision_ok if vision_ok is not None else Path(vision.path).is_dir()):
        missing.append(("model.vision.path", Path(vision.path)))
    return missing


def missing_data(config: Config) -> list[tuple[str, Path]]:
    """(config key, path) of every prepared JSONL the data section reads that does not exist."""
    data = config.data
    wanted = [(f"data.sources.{n}", source_path(data, n, s)) for n, s in data.sources.items()]
    if data.eval_file is not None:
        wanted.append(("data.eval_file", Path(data.prepared_dir) / data.eval_file))
    return [(key, path) for key, path in wanted if not path.is_file()]


def header_commands(recipe: Path) -> list[str]:
    """The commands in a recipe's leading comments (continuation lines joined, labels dropped)."""
    commands: list[str] = []
    pending = ""
    for line in recipe.read_text(encoding="utf-8").splitlines():
        if not line.lstrip().startswith("#"):
            break
        text = pending + " " + line.lstrip().lstrip("#").split(" # ")[0].strip()
        text = re.sub(r"^\s*[A-Z][\w ()-]*:\s+", "", text.strip())  # "Data: dsvl ..." -> "dsvl ..."
        if text.endswith("\\"):
            pending = text[:-1].strip()
            continue
        pending = ""
        commands.append(" ".join(text.split()))
    return [c for c in commands if c.startswith(("huggingface-cli ", "hf ", "dsvl "))]


def _outputs(command: str) -> list[str]:
    """The folders a command writes (the values of --local-dir / --out)."""
    tokens = shlex.split(command)
    return [tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t in _OUTPUT_FLAGS]


def model_hints(recipe: Path, missing: list[Path]) -> list[str]:
    """Header commands that write the missing model paths, preceded by those they need."""
    commands = header_commands(recipe)
    wanted = {str(p) for p in missing}
    chosen = [c for c in commands if wanted & set(_outputs(c))]
    for command in list(chosen):
        needs = set(shlex.split(command))
        makers = [c for c in commands if c not in chosen and needs & set(_outputs(c))]
        makers = [c for c in makers if not all(Path(o).exists() for o in _outputs(c))]
        chosen[chosen.index(command) : chosen.index(command)] = makers
    return chosen


def data_hint(config: Config) -> str:
    """The `dsvl prepare-data` command that writes this config's prepared files."""
    names = list(config.data.sources)
    raw = "" if names == ["synthetic"] else " --data-path RAW_DATA"
    return f"dsvl prepare-data {' '.join(names)}{raw} --out {config.data.prepared_dir}"


def _under(path: Path, folder: str) -> bool:
    return Path(folder) in path.parents


def _data_summary(data: list[tuple[str, Path]]) -> list[str]:
    """Missing prepared files grouped by folder: 'prepared data DIR/ (a.jsonl, b.jsonl)'."""
    folders: dict[Path, list[str]] = {}
    for _, path in data:
        folders.setdefault(path.parent, []).append(path.name)
    return [f"prepared data {folder}/ ({', '.join(names)})" for folder, names in folders.items()]


def check_inputs(config: Config, recipe: Path) -> None:
    """Raise MissingInputsError naming every missing base model / prepared file and the fix."""
    models, data = missing_models(config), missing_data(config)
    if not models and not data:
        return
    # `prepare-data synthetic` writes its tiny base models into the data folder too.
    synthetic = "synthetic" in config.data.sources
    downloads = [p for _, p in models if not (synthetic and _under(p, config.data.prepared_dir))]
    fixes = model_hints(recipe, downloads)
    hinted = {out for command in fixes for out in _outputs(command)}
    if any(str(p) not in hinted for p in downloads):
        fixes.append(f"the comments at the top of {recipe} name the base models to download")
    if data or len(downloads) < len(models):
        fixes.append(data_hint(config))
    what = ", ".join([f"{key} {path}" for key, path in models] + _data_summary(data))
    raise MissingInputsError(
        f"{recipe}: not on this machine: {what}. Get them with: {'; '.join(fixes)} "
        "(or point those keys at your copies, e.g. model.language_model=DIR)"
    )


def warn_missing_inputs(config: Config, recipe: Path) -> None:
    """`--dry-run`: log (stderr) what a real run would miss on this machine; never raise."""
    try:
        check_inputs(config, recipe)
    except MissingInputsError as err:
        log.warning("%s", err)
