"""No model folder given: chat, eval and fuse-lora use the newest export under ./outputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsvl_cli.errors import CheckpointError
from dsvl_cli.model.discovery import (
    EXPORT_FORMAT,
    FUSED_FORMAT,
    find_newest_model,
    model_folders,
    model_or_newest,
)


def fake_folder(folder: Path, fmt: str, mtime: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("model: {}\n")
    (folder / "meta.json").write_text(json.dumps({"format": fmt}))
    os.utime(folder / "meta.json", (mtime, mtime))
    return folder


def test_newest_by_meta_time(tmp_path: Path) -> None:
    old = fake_folder(tmp_path / "run-a/final", EXPORT_FORMAT, 1_000)
    new = fake_folder(tmp_path / "run-b/epoch-2", EXPORT_FORMAT, 3_000)
    fake_folder(tmp_path / "run-b/best", EXPORT_FORMAT, 2_000)
    assert find_newest_model(tmp_path) == new
    os.utime(old / "meta.json", (5_000, 5_000))
    assert find_newest_model(tmp_path) == old


def test_formats_and_leftovers(tmp_path: Path) -> None:
    export = fake_folder(tmp_path / "run/final", EXPORT_FORMAT, 1_000)
    fused = fake_folder(tmp_path / "run/fused", FUSED_FORMAT, 2_000)
    fake_folder(tmp_path / "run/.final.tmp", EXPORT_FORMAT, 9_000)  # an export being written
    fake_folder(tmp_path / "run/other", "something-else", 9_000)
    (tmp_path / "run/broken").mkdir()
    (tmp_path / "run/broken/meta.json").write_text("{not json")
    (tmp_path / "run/broken/config.yaml").write_text("")
    (tmp_path / "run/no-config").mkdir()
    (tmp_path / "run/no-config/meta.json").write_text(json.dumps({"format": EXPORT_FORMAT}))
    assert model_folders(tmp_path) == [export, fused]
    assert find_newest_model(tmp_path) == fused
    assert find_newest_model(tmp_path, formats=(EXPORT_FORMAT,)) == export


def test_none_found_says_how_to_choose(tmp_path: Path) -> None:
    for root in (tmp_path / "missing", tmp_path):
        with pytest.raises(CheckpointError, match="no model folder given") as err:
            find_newest_model(root)
        assert "pass one" in str(err.value) and "dsvl train tiny" in str(err.value)


def test_given_folder_wins(tmp_path: Path) -> None:
    fake_folder(tmp_path / "outputs/run/final", EXPORT_FORMAT, 1_000)
    assert model_or_newest(Path("mine"), root=tmp_path / "outputs") == Path("mine")
    assert model_or_newest(None, root=tmp_path / "outputs") == tmp_path / "outputs/run/final"


def test_formats_match_the_folder_writer() -> None:
    import importlib

    # The writer's module moves from train/export.py to model/folder.py; either one counts.
    for name in ("dsvl_cli.model.folder", "dsvl_cli.train.export"):
        try:
            writer = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(writer, "FUSED_FORMAT"):
            assert (writer.EXPORT_FORMAT, writer.FUSED_FORMAT) == (EXPORT_FORMAT, FUSED_FORMAT)
            return
    pytest.fail("no module defines EXPORT_FORMAT / FUSED_FORMAT")


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dsvl_cli", *args], cwd=cwd, capture_output=True, text=True
    )


def test_commands_without_model_and_without_outputs(tmp_path: Path) -> None:
    for args in (
        ["chat", "--prompt", "Hi"],
        ["eval", "--data", "x.jsonl"],
        ["fuse-lora", "--out", "f"],
    ):
        result = run(*args, cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "no model folder given" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_chat_uses_newest_export_with_two_images(tmp_path: Path) -> None:
    """The promised usage, verbatim: `dsvl chat --images a.png b.png --prompt ...`."""
    from inference_helpers import make_export

    from dsvl_cli.inference.generation import GenerationSettings
    from dsvl_cli.inference.loader import load_for_inference
    from dsvl_cli.inference.session import ChatSession

    make_export(tmp_path, max_images_per_sample=3)
    final = tmp_path / "outputs/run/final"
    final.parent.mkdir(parents=True)
    shutil.move(tmp_path / "export", final)
    a, b = (str(tmp_path / "images" / f"{k:06d}.png") for k in (0, 1))
    shutil.copy(a, tmp_path / "a.png")
    shutil.copy(b, tmp_path / "b.png")
    question = "Which shape is red?"
    args = ["--max-new-tokens", "6", "--repetition-penalty", "1.5", "--device", "cpu"]
    result = run("chat", "--images", "a.png", "b.png", "--prompt", question, *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "using the newest" in result.stderr and "final" in result.stderr
    settings = GenerationSettings(max_new_tokens=6, repetition_penalty=1.5)
    session = ChatSession.from_loaded(
        load_for_inference(final, device="cpu", dtype="fp32"), settings
    )
    assert result.stdout == session.ask(question, [a, b]).text + "\n"
    # Proof that both paths reached the model: one image over the limit fails.
    three = run(
        "chat", "--images", "a.png", "b.png", "a.png", "b.png", "--prompt", "Hi", cwd=tmp_path
    )
    assert three.returncode == 2 and "Traceback" not in three.stderr
