"""`dsvl chat`: the scripted REPL, one-shot --prompt, and turns piped through stdin."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rich.console import Console

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from inference_helpers import make_export, steer  # noqa: E402

from dsvl_cli.errors import DataError  # noqa: E402
from dsvl_cli.inference.chat import ChatRepl, run_chat  # noqa: E402
from dsvl_cli.inference.generation import GenerationSettings  # noqa: E402
from dsvl_cli.inference.loader import LoadedModel, load_for_inference  # noqa: E402
from dsvl_cli.inference.session import ChatSession  # noqa: E402

SETTINGS = GenerationSettings(max_new_tokens=6, repetition_penalty=1.5)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_export(tmp_path_factory.mktemp("shapes"), max_images_per_sample=3)


@pytest.fixture(scope="module")
def loaded(shapes: Path) -> LoadedModel:
    """The export with its LM head biased toward a few words, so answers are readable."""
    return steer(load_for_inference(shapes / "export", device="cpu", dtype="fp32"))


def image(shapes: Path, k: int) -> str:
    return str(shapes / "images" / f"{k:06d}.png")


def console() -> Console:
    return Console(file=io.StringIO(), width=200, soft_wrap=True, color_system=None)


def text_of(c: Console) -> str:
    return c.file.getvalue()  # type: ignore[attr-defined]


def lines(*items: str) -> Callable[[], str]:
    feed: Iterator[str] = iter(items)

    def read() -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    return read


def test_scripted_repl_session(loaded: LoadedModel, shapes: Path, tmp_path: Path) -> None:
    session = ChatSession.from_loaded(loaded, SETTINGS)
    out = console()
    repl = ChatRepl(session, out, out, interactive=True, model_folder=shapes / "export")
    repl.banner()
    assert repl.attach([image(shapes, 0)])  # what --images does: attach to the first question
    transcript = tmp_path / "chat.json"
    code = repl.run(
        lines(
            "What colour is the square?",
            f"/image {image(shapes, 1)} {image(shapes, 2)}",
            "And these two?",
            f"/save {transcript}",
            "/frobnicate",
            f"/image {image(shapes, 3)}",  # a 4th image: over max_images_per_sample=3
            "/clear",
            f"/image {tmp_path / 'missing.png'}",
            "Which shape is red?",
            "/help",
            "/quit",
            "never read",
        )
    )
    text = text_of(out)
    assert code == 0
    assert "generation: max_new_tokens=6, greedy (temperature=0)" in text
    assert "at most 3 images per conversation" in text
    for k in (1, 2, 3):
        assert f"image {k}: {image(shapes, k - 1)}" in text
    assert "error: unknown command /frobnicate; /help lists commands" in text
    assert "missing.png: missing" in text
    assert "too many images: the conversation would hold 4" in text
    assert "(new conversation)" in text and "/save FILE" in text
    saved = json.loads(transcript.read_text(encoding="utf-8"))
    assert saved["images"] == [image(shapes, k) for k in range(3)]
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"] * 2
    assert saved["messages"][2]["content"] == "<image>\n<image>\nAnd these two?"
    # After /clear: one text-only round, no images, answers streamed into the output.
    assert len(session.rounds) == 1 and session.images == []
    assert session.rounds[0].answer in text


def test_bad_input_lines_keep_the_session(loaded: LoadedModel, shapes: Path) -> None:
    session = ChatSession.from_loaded(loaded, SETTINGS)
    out, err = console(), console()
    repl = ChatRepl(session, out, err, interactive=False)
    code = repl.run(
        lines(
            "/image",
            '/image "unclosed',
            "/save",
            "//etc is a folder?",
            "",
            f"/image {image(shapes, 0)}",
            "What colour?",
        )
    )
    assert code == 1  # piped use: a failed line shows in the exit code
    errors = text_of(err).splitlines()
    assert errors[0] == "error: usage: /image PATH ..."
    assert errors[1].startswith("error: cannot read")
    assert errors[2] == "error: usage: /save FILE"
    assert len(errors) == 3
    assert [r.question for r in session.rounds] == ["/etc is a folder?", "What colour?"]
    assert session.images == [image(shapes, 0)]
    assert text_of(out) == "".join(f"{r.answer}\n" for r in session.rounds)


def expected_answers(shapes: Path, turns: list[tuple[str, list[str]]]) -> list[str]:
    loaded = load_for_inference(shapes / "export", device="cpu", dtype="fp32")
    session = ChatSession.from_loaded(loaded, SETTINGS)
    return [session.ask(q, images).text for q, images in turns]


def test_one_shot_prompt_prints_only_the_answer(shapes: Path) -> None:
    out = console()
    code = run_chat(
        shapes / "export",
        images=[Path(image(shapes, 0))],
        prompt="What colour is the square?",
        settings=SETTINGS,
        device="cpu",
        out=out,
    )
    expected = expected_answers(shapes, [("What colour is the square?", [image(shapes, 0)])])
    assert code == 0 and text_of(out) == f"{expected[0]}\n"
    with pytest.raises(DataError, match="missing"):
        run_chat(shapes / "export", [shapes / "nope.png"], "Hi", SETTINGS, device="cpu", out=out)


def test_piped_stdin_turns_print_one_answer_each(shapes: Path) -> None:
    out, err = console(), console()
    stdin = io.StringIO(f"What colour?\n/image {image(shapes, 1)}\nAnd this one?\n")
    code = run_chat(
        shapes / "export",
        images=[Path(image(shapes, 0))],
        settings=SETTINGS,
        device="cpu",
        stdin=stdin,
        out=out,
        err=err,
    )
    expected = expected_answers(
        shapes, [("What colour?", [image(shapes, 0)]), ("And this one?", [image(shapes, 1)])]
    )
    assert code == 0 and text_of(err) == ""
    assert text_of(out) == "".join(f"{a}\n" for a in expected)
