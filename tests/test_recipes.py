"""Shipped recipes: `dsvl recipes`, `dsvl recipes copy`, and `dsvl train NAME` resolution."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsvl_cli.cli import app
from dsvl_cli.errors import ConfigError
from dsvl_cli.recipe_registry import copy_recipe, list_recipes, resolve_recipe, shipped_recipe

ROOT = Path(__file__).parent.parent
NAMES = ["7b", "13b", "70b", "tiny"]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dsvl_cli", *args], cwd=cwd, capture_output=True, text=True
    )


def test_list_recipes_names_descriptions_paths() -> None:
    recipes = list_recipes()
    assert [r.name for r in recipes] == NAMES
    for recipe in recipes:
        assert recipe.path.is_file() and recipe.path.name == f"{recipe.name}.yaml"
        assert recipe.description and "\n" not in recipe.description
    assert list_recipes()[-1].description.startswith("Tiny demo:")


def test_resolve_name_path_and_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    tiny = shipped_recipe("tiny")
    assert resolve_recipe("tiny") == tiny == resolve_recipe("tiny.yaml")
    assert tiny.is_absolute()
    assert resolve_recipe(ROOT / "recipes" / "7b.yaml") == ROOT / "recipes" / "7b.yaml"
    # Outside a checkout, the docs' `recipes/tiny.yaml` means the shipped one ...
    assert resolve_recipe("recipes/tiny.yaml") == tiny
    # ... but a file that exists always wins, whatever its name.
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "tiny.yaml").write_text("model: {}\n")
    (tmp_path / "tiny").write_text("model: {}\n")
    assert resolve_recipe("recipes/tiny.yaml") == Path("recipes/tiny.yaml")
    assert resolve_recipe("tiny") == Path("tiny")


@pytest.mark.parametrize("arg", ["tinyy", "somewhere/tiny.yaml", "mine.yaml"])
def test_unknown_recipe_lists_names(
    arg: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="not found") as err:
        resolve_recipe(arg)
    assert "7b, 13b, 70b, tiny" in str(err.value) and "dsvl recipes" in str(err.value)


def test_copy_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert copy_recipe("tiny") == Path("tiny.yaml")
    assert (tmp_path / "tiny.yaml").read_bytes() == shipped_recipe("tiny").read_bytes()
    with pytest.raises(ConfigError, match="--force"):
        copy_recipe("tiny")
    (tmp_path / "tiny.yaml").write_text("edited\n")
    copy_recipe("tiny", force=True)
    assert (tmp_path / "tiny.yaml").read_bytes() == shipped_recipe("tiny").read_bytes()
    (tmp_path / "mine").mkdir()
    assert copy_recipe("7b", Path("mine")) == Path("mine/7b.yaml")
    assert copy_recipe("7b", Path("new/dir/big.yaml")).is_file()
    with pytest.raises(ConfigError, match="no recipe named 'huge'"):
        copy_recipe("huge")


def test_recipes_command_lists_one_line_each() -> None:
    result = CliRunner().invoke(app, ["recipes"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == NAMES
    for line, recipe in zip(lines, list_recipes(), strict=True):
        assert recipe.description in line and line.endswith(str(recipe.path))


def test_recipes_copy_command(tmp_path: Path) -> None:
    result = run("recipes", "copy", "tiny", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "tiny.yaml").is_file() and "dsvl train tiny.yaml" in result.stdout
    again = run("recipes", "copy", "tiny", cwd=tmp_path)
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr
    assert run("recipes", "copy", "tiny", "--force", cwd=tmp_path).returncode == 0
    unknown = run("recipes", "copy", "huge", "x.yaml", cwd=tmp_path)
    assert unknown.returncode == 2 and "7b, 13b, 70b, tiny" in unknown.stderr


def test_train_without_recipe_lists_names(tmp_path: Path) -> None:
    result = run("train", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "7b, 13b, 70b, tiny" in result.stderr and "dsvl recipes" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_train_unknown_name_exit_2(tmp_path: Path) -> None:
    result = run("train", "tinny", "--dry-run", cwd=tmp_path)
    assert result.returncode == 2 and "not found" in result.stderr
    assert "7b, 13b, 70b, tiny" in result.stderr


def test_train_by_name_equals_train_by_file(tmp_path: Path) -> None:
    """Paths inside a recipe are relative to the working directory either way."""
    by_name = run("train", "tiny", "--dry-run", "train.seed=7", cwd=tmp_path)
    by_file = run(
        "train", str(ROOT / "recipes/tiny.yaml"), "--dry-run", "train.seed=7", cwd=tmp_path
    )
    assert by_name.returncode == 0, by_name.stderr
    assert by_name.stdout == by_file.stdout
    assert "language_model: data/shapes/models/lm" in by_name.stdout and "seed: 7" in by_name.stdout


def test_relaunch_gets_the_recipe_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dsvl train tiny --hostfile F` hands the deepspeed launcher a path, not the name."""
    import dsvl_cli.train.launch as launch
    import dsvl_cli.train.preflight as preflight

    calls: list[list[str]] = []
    monkeypatch.setattr(launch.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    monkeypatch.setattr(preflight, "check_inputs", lambda config, recipe: None)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hostfile").write_text("localhost slots=1\n")
    result = CliRunner().invoke(app, ["train", "tiny", "--hostfile", "hostfile", "train.seed=3"])
    assert result.exit_code == 0, result.output
    (cmd,) = calls
    recipe = Path(cmd[cmd.index("train") + 1])
    assert recipe == shipped_recipe("tiny") and recipe.is_absolute() and recipe.is_file()
    assert cmd[-1] == "train.seed=3"


def test_copy_to_an_unwritable_place_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot write .*; give another DEST"):
        copy_recipe("tiny", blocker / "sub" / "tiny.yaml")
