"""The wheel: every dsvl_cli package listed in pyproject.toml, recipes shipped inside."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from importlib.resources import files
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def test_every_package_is_listed() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "dsvl_cli").rglob("__init__.py")
    }
    assert found | {"dsvl_cli.recipes"} == listed


def test_recipes_import_as_package_data() -> None:
    names = {p.name for p in files("dsvl_cli.recipes").iterdir() if p.name.endswith(".yaml")}
    assert names == {p.name for p in (ROOT / "recipes").glob("*.yaml")}


def test_wheel_contains_recipes(tmp_path: Path) -> None:
    # Build from a copy so the checkout gets no build/ folder.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("dsvl_cli", "recipes"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    cmd = [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation"]
    result = subprocess.run(
        [*cmd, "-q", "-w", str(tmp_path / "dist")], cwd=src, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("dsvl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in (ROOT / "recipes").glob("*.yaml"):
        assert f"dsvl_cli/recipes/{recipe.name}" in names
    assert "dsvl_cli/recipes/__init__.py" in names and "dsvl_cli/cli.py" in names


def test_data_does_not_import_model_or_demo() -> None:
    """data/ is the layer under model/ and the demo: importing all of it loads neither."""
    code = (
        "import pkgutil, importlib, sys, dsvl_cli.data as d\n"
        "for m in pkgutil.walk_packages(d.__path__, 'dsvl_cli.data.'):\n"
        "    importlib.import_module(m.name)\n"
        "above = ('dsvl_cli.model', 'dsvl_cli.demo')\n"
        "bad = sorted(m for m in sys.modules if m.startswith(above))\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
