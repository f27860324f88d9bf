"""The `dsvl` command as a user runs it: help, version, env, dry-run, errors and exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dsvl_cli import __version__

ROOT = Path(__file__).parent.parent


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dsvl_cli", *args], cwd=cwd, capture_output=True, text=True
    )


def test_help_lists_commands() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("env", "prepare-data", "train"):
        assert command in result.stdout


def test_help_does_not_import_torch() -> None:
    code = "import sys; from dsvl_cli import cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"dsvl {__version__}"


def test_env_reports_versions() -> None:
    result = run("env")
    assert result.returncode == 0
    for key in (
        "dsvl",
        "Python",
        "torch",
        "deepspeed",
        "transformers",
        "peft",
        "open_clip_torch",
        "GPUs",
    ):
        assert key in result.stdout


@pytest.mark.parametrize("recipe", ["tiny", "7b", "13b", "70b"])
def test_dry_run_prints_resolved_config(recipe: str) -> None:
    result = run("train", f"recipes/{recipe}.yaml", "--dry-run", "train.seed=7")
    assert result.returncode == 0, result.stderr
    assert "language_model:" in result.stdout and "seed: 7" in result.stdout


def test_config_errors_exit_2_with_one_message() -> None:
    result = run("train", "recipes/tiny.yaml", "optim.lr=abc", "trian.epochs=2")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "optim.lr" in result.stderr and "did you mean 'train'" in result.stderr


def test_missing_recipe_exit_2(tmp_path: Path) -> None:
    result = run("train", str(tmp_path / "none.yaml"), "--dry-run")
    assert result.returncode == 2 and "not found" in result.stderr


def test_prepare_data_synthetic_is_deterministic(tmp_path: Path) -> None:
    import hashlib

    def digest(folder: Path) -> dict[str, str]:
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        return {
            str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
        }

    for name in ("a", "b"):
        result = run("prepare-data", "synthetic", "--out", str(tmp_path / name), "--num", "30")
        assert result.returncode == 0, result.stderr
    first, second = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert first == second
    assert {"train.jsonl", "eval.jsonl", "manifest.json"} <= set(first)
    assert any(name.startswith("images/") for name in first)
