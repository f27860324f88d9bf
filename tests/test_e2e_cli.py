"""The whole pipeline as a user types it, one subprocess per command.

prepare-data synthetic -> train (one epoch) -> eval -> chat --prompt -> fuse-lora -> chat on the
fused folder. The last steps run from other working directories, on copies of the export and the
fused folder in paths holding spaces, with `--images a.png b.png` as users write it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
QUESTION = "Which image has a blue square, the first or the second?"


def dsvl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the installed `dsvl` script (as a user would), or `python -m dsvl_cli` without one."""
    script = Path(sys.executable).with_name("dsvl")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "dsvl_cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*command, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, f"dsvl {' '.join(args)}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work folder with data/shapes and outputs/tiny after one epoch of the tiny recipe (LoRA)."""
    work = tmp_path_factory.mktemp("user work")
    dsvl("prepare-data", "synthetic", "--out", "data/shapes", "--num", "80", cwd=work)
    dsvl(
        "train",
        str(ROOT / "recipes" / "tiny.yaml"),
        "train.epochs=1",
        "train.micro_batch_size=8",
        "train.global_batch_size=8",
        "train.eval_batch_size=8",
        "trainable.language_model=lora",
        "trainable.vision=frozen",
        cwd=work,
    )
    return work


def test_train_writes_the_exports(trained: Path) -> None:
    final = trained / "outputs" / "tiny" / "final"
    meta = json.loads((final / "meta.json").read_text())
    assert meta["format"] == "dsvl-export"
    assert (final / "adapters" / "language_model" / "adapter_config.json").is_file()


def test_eval_then_chat_in_the_run_folder(trained: Path) -> None:
    result = dsvl(
        "eval",
        "outputs/tiny/final",
        "--data",
        "data/shapes/eval.jsonl",
        "--limit",
        "8",
        "--max-new-tokens",
        "4",
        cwd=trained,
    )
    assert "eval-results" in result.stdout + result.stderr  # says where the results went
    images = ["data/shapes/images/000000.png", "data/shapes/images/000001.png"]
    chat = dsvl(
        "chat", "--images", *images, "--prompt", QUESTION, "--max-new-tokens", "4", cwd=trained
    )
    assert chat.stdout.strip()  # the answer (random-ish tiny model: any text)
    assert "outputs/tiny/final" in chat.stderr  # which export the default picked


def test_exports_travel_and_fuse_from_elsewhere(trained: Path, tmp_path: Path) -> None:
    moved = tmp_path / "copied export"
    shutil.copytree(trained / "outputs" / "tiny" / "final", moved)
    elsewhere = tmp_path / "another dir"
    elsewhere.mkdir()
    image_a = trained / "data" / "shapes" / "images" / "000000.png"
    image_b = trained / "data" / "shapes" / "images" / "000001.png"
    ask = ["--images", str(image_a), str(image_b), "--prompt", QUESTION, "--max-new-tokens", "4"]
    from_copy = dsvl("chat", str(moved), *ask, cwd=Path("/"))
    fused = tmp_path / "fused model"
    dsvl("fuse-lora", str(moved), "--out", str(fused), cwd=elsewhere)
    from_fused = dsvl("chat", str(fused), *ask, cwd=Path("/"))
    assert from_fused.stdout.strip() == from_copy.stdout.strip()  # greedy: same answer
