"""The recipes shipped with dsvl: list them, resolve a name to a file, copy one out.

The YAML files live in the top-level `recipes/` folder of the repository and install as the
`dsvl_cli.recipes` package (see pyproject.toml), so `importlib.resources` finds them both in an
editable install and from a wheel. A recipe argument is a file path or a recipe name: a file
that exists wins, then a name such as `tiny` (or `tiny.yaml`) picks the shipped recipe, and so
does `recipes/tiny.yaml` where no such file exists (the form the docs use, outside a checkout).
Paths inside a recipe (models, data) stay relative to the working directory either way.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from dsvl_cli.errors import ConfigError
from dsvl_cli.log import get_logger

log = get_logger(__name__)

PACKAGE = "dsvl_cli.recipes"


@dataclass(frozen=True)
class Recipe:
    """One shipped recipe: its name (file stem), a one-line description, its file."""

    name: str
    description: str
    path: Path


def recipes_dir() -> Path:
    """The folder the shipped recipes are read from (the repository's recipes/ when editable)."""
    return Path(str(files(PACKAGE)))


def _natural_key(name: str) -> tuple[int, int | str]:
    """7b before 13b before 70b; names without a leading number after them."""
    match = re.match(r"(\d+)", name)
    return (0, int(match.group(1))) if match else (1, name)


def describe(path: Path) -> str:
    """The recipe's first comment paragraph, joined into one line ('' when it has none)."""
    words: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            break
        text = stripped.lstrip("#").strip()
        if not text:
            if words:
                break
            continue
        words.append(text)
    return " ".join(words)


def list_recipes() -> list[Recipe]:
    """Every shipped recipe, smallest model first."""
    paths = sorted(recipes_dir().glob("*.yaml"), key=lambda p: _natural_key(p.stem))
    return [Recipe(p.stem, describe(p), p) for p in paths]


def recipe_names() -> list[str]:
    """The names `dsvl train NAME` accepts."""
    return [recipe.name for recipe in list_recipes()]


def _names_hint() -> str:
    return f"one of {', '.join(recipe_names())} (`dsvl recipes` lists them)"


def _find(name: str) -> Path | None:
    stem = name.removesuffix(".yaml")
    return next((r.path for r in list_recipes() if r.name == stem), None)


def shipped_recipe(name: str) -> Path:
    """The file of the shipped recipe `name` (with or without .yaml); ConfigError if none."""
    path = _find(name)
    if path is None:
        raise ConfigError(f"no recipe named {name!r}; give {_names_hint()}")
    return path


def resolve_recipe(arg: str | Path) -> Path:
    """A recipe argument as a file: an existing file as given, else a shipped recipe's name.

    Raises:
        ConfigError: neither an existing file nor a recipe name; the message lists the names.
    """
    path = Path(arg)
    if path.is_file():
        return path
    text = str(arg)
    named = None if "/" in text or "\\" in text else _find(text)
    if named is None and not path.is_absolute() and path.parts[:-1] == ("recipes",):
        named = _find(path.name)  # `recipes/tiny.yaml` as the docs write it, outside a checkout
        if named is not None:
            log.info("%s is not here; using the shipped recipe %s", text, named)
    if named is None:
        raise ConfigError(
            f"recipe {text} not found (no such file, nor a recipe name); give a YAML file or "
            f"{_names_hint()}"
        )
    return named


def missing_recipe_message() -> str:
    """What `dsvl train` without a recipe says."""
    return (
        f"dsvl train needs a recipe: a YAML file or {_names_hint()}; "
        "`dsvl recipes copy NAME` writes an editable copy"
    )


def copy_recipe(name: str, dest: Path | None = None, force: bool = False) -> Path:
    """Copy the shipped recipe `name` to `dest` (default ./NAME.yaml; a folder gets NAME.yaml).

    Raises:
        ConfigError: unknown name, `dest` exists and `force` is off, or it cannot be written.
    """
    source = shipped_recipe(name)
    target = Path(dest) if dest is not None else Path(source.name)
    if target.is_dir():
        target = target / source.name
    if target.exists() and not force:
        raise ConfigError(f"{target} exists; pass --force to overwrite it or give another DEST")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    except OSError as err:
        raise ConfigError(f"cannot write {target}: {err.strerror}; give another DEST") from err
    return target
