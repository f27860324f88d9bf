"""`dsvl chat --images a.png b.png`: several values after one flag, parsed without a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from dsvl_cli.cli import app
from dsvl_cli.cli_multivalue import expand_multi_values

FLAGS = ("--images",)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--images", "a", "b"], ["--images", "a", "--images", "b"]),
        (["--images=a", "b", "--prompt", "x"], ["--images=a", "--images", "b", "--prompt", "x"]),
        (
            ["--images", "a", "--images", "b", "c"],
            ["--images", "a", "--images", "b", "--images", "c"],
        ),
        (["--image", "a", "b"], ["--image", "a", "b"]),  # --image takes one path
        (["m", "--images", "-odd.png", "b"], ["m", "--images", "-odd.png", "--images", "b"]),
        (["--images", "a", "--", "b"], ["--images", "a", "--", "b"]),
        (["--images"], ["--images"]),  # click reports the missing value
    ],
)
def test_expand(args: list[str], expected: list[str]) -> None:
    assert expand_multi_values(args, FLAGS) == expected


def test_a_folder_ends_the_images(tmp_path: Path) -> None:
    folder = str(tmp_path)
    assert expand_multi_values(["--images", "a", "b", folder], FLAGS) == [
        "--images",
        "a",
        "--images",
        "b",
        folder,
    ]


@pytest.fixture
def chat_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace the model side of `dsvl chat` with a recorder."""
    import dsvl_cli.inference.chat as chat
    import dsvl_cli.model.discovery as discovery

    calls: list[dict[str, Any]] = []

    def fake_run_chat(
        model: Path, images: list[Path], prompt: str | None, *rest: Any, **options: Any
    ) -> int:
        calls.append({"model": model, "images": images, "prompt": prompt})
        return 0

    monkeypatch.setattr(chat, "run_chat", fake_run_chat)
    monkeypatch.setattr(discovery, "find_newest_model", lambda *a, **k: Path("outputs/x/final"))
    return calls


@pytest.mark.parametrize(
    "args",
    [
        ["--images", "a.png", "b.png", "--prompt", "Which is red?"],
        ["--prompt", "Which is red?", "--images", "a.png", "b.png"],
        ["--image", "a.png", "--image", "b.png", "--prompt", "Which is red?"],
        ["--images", "a.png", "--images", "b.png", "--prompt", "Which is red?"],
    ],
)
def test_chat_parses_two_images(args: list[str], chat_calls: list[dict[str, Any]]) -> None:
    result = CliRunner().invoke(app, ["chat", *args, "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    (call,) = chat_calls
    assert call["images"] == [Path("a.png"), Path("b.png")]
    assert call["prompt"] == "Which is red?" and call["model"] == Path("outputs/x/final")


def test_chat_model_after_images(tmp_path: Path, chat_calls: list[dict[str, Any]]) -> None:
    args = ["chat", "--images", "a.png", "b.png", str(tmp_path), "--prompt", "Hi"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert chat_calls[0]["images"] == [Path("a.png"), Path("b.png")]
    assert chat_calls[0]["model"] == tmp_path


def test_chat_help_documents_images() -> None:
    result = CliRunner().invoke(app, ["chat", "--help"])
    text = result.stdout.replace("│", " ")  # rich's panel border where the help text wraps
    assert "--images A.png B.png" in " ".join(text.split())
