"""Before training: one line naming the missing base models / prepared data and how to get them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dsvl_cli.config import load_config
from dsvl_cli.demo.synthetic import generate_synthetic
from dsvl_cli.train.preflight import MissingInputsError, check_inputs, header_commands

ROOT = Path(__file__).parent.parent


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dsvl_cli", *args], cwd=cwd, capture_output=True, text=True
    )


def test_70b_names_models_data_and_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    recipe = ROOT / "recipes" / "70b.yaml"
    with pytest.raises(MissingInputsError) as err:
        check_inputs(load_config(recipe), recipe)
    message = str(err.value)
    for text in (
        "model.language_model models/Llama-2-70b-hf",
        "model.vision.path models/qwen-vit",
        "prepared data data/prepared/ (llava.jsonl, llava_dial.jsonl",
        "huggingface-cli download meta-llama/Llama-2-70b-hf --local-dir models/Llama-2-70b-hf",
        # the vision tower needs Qwen-VL-Chat first, then the extraction
        "huggingface-cli download Qwen/Qwen-VL-Chat --local-dir models/Qwen-VL-Chat; "
        "dsvl extract-qwen models/Qwen-VL-Chat --out models/qwen-vit",
        "dsvl prepare-data llava llava_dial",
        "--out data/prepared",
    ):
        assert text in message
    assert "\n" not in message


def test_only_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    recipe = ROOT / "recipes" / "7b.yaml"
    (tmp_path / "models/Llama-2-7b-hf").mkdir(parents=True)
    (tmp_path / "data/prepared").mkdir(parents=True)
    for name in load_config(recipe).data.sources:
        (tmp_path / "data/prepared" / f"{name}.jsonl").write_text("{}\n")
    with pytest.raises(MissingInputsError) as err:
        check_inputs(load_config(recipe), recipe)
    message = str(err.value)
    assert "model.vision.path models/clip-vit-large-patch14" in message
    assert "--local-dir models/clip-vit-large-patch14" in message
    assert "Llama-2-7b-hf" not in message and "prepare-data" not in message


def test_tiny_points_at_the_synthetic_generator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = ROOT / "recipes" / "tiny.yaml"
    result = run("train", str(recipe), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "Get them with: dsvl prepare-data synthetic --out data/shapes (" in result.stderr
    generate_synthetic(tmp_path / "data/shapes", num=12, seed=0)
    monkeypatch.chdir(tmp_path)
    check_inputs(load_config(recipe), recipe)  # now complete: no error


@pytest.mark.parametrize("recipe", ["7b", "13b", "70b"])
def test_big_recipes_fail_in_one_line(recipe: str, tmp_path: Path) -> None:
    result = run("train", str(ROOT / "recipes" / f"{recipe}.yaml"), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "not on this machine" in result.stderr
    assert "huggingface-cli download" in result.stderr


def test_dry_run_still_works_and_warns(tmp_path: Path) -> None:
    result = run("train", str(ROOT / "recipes" / "70b.yaml"), "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "not on this machine" in " ".join(result.stderr.split())


def test_header_commands_join_continuations() -> None:
    commands = header_commands(ROOT / "recipes" / "13b.yaml")
    data = [c for c in commands if c.startswith("dsvl prepare-data")]
    assert data and data[0].endswith("--data-path data/raw --out data/prepared")
    assert "dsvl extract-qwen models/Qwen-VL-Chat --out models/qwen-vit" in commands


def test_extract_qwen_without_arguments(tmp_path: Path) -> None:
    for args in (["extract-qwen"], ["extract-qwen", "models/Qwen-VL-Chat"]):
        result = run(*args, cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert "a local Qwen-VL-Chat" in result.stderr and "--out" in result.stderr
