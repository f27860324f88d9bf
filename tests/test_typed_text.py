"""Typed text (chat prompts, eval questions, answers) never becomes an image slot or a special
token: image ids come only from attached images, whatever the text spells."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from rich.console import Console

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from inference_helpers import make_export, steer  # noqa: E402

from dsvl_cli.data.conversation import (  # noqa: E402
    IMAGE_PLACEHOLDER,
    Conversation,
    Message,
    escape_typed,
)
from dsvl_cli.data.template import encode_conversation, encode_prompt  # noqa: E402
from dsvl_cli.inference.chat import run_chat  # noqa: E402
from dsvl_cli.inference.generation import GenerationSettings  # noqa: E402
from dsvl_cli.inference.loader import LoadedModel, load_for_inference  # noqa: E402
from dsvl_cli.inference.session import ChatSession, user_content  # noqa: E402

SETTINGS = GenerationSettings(max_new_tokens=4)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_export(tmp_path_factory.mktemp("typed"))


@pytest.fixture(scope="module")
def loaded(shapes: Path) -> LoadedModel:
    return steer(load_for_inference(shapes / "export", device="cpu", dtype="fp32"))


def special_tokens(loaded: LoadedModel) -> list[str]:
    """Every special or added token of the tokenizer (BOS, EOS, pad, unk, `<image>`)."""
    tok = loaded.built.tokenizer
    specials = sorted({t for t in tok.all_special_tokens if t} | set(tok.get_added_vocab()))
    assert IMAGE_PLACEHOLDER in specials and tok.eos_token in specials and tok.bos_token in specials
    return specials


def typed_prompt(loaded: LoadedModel) -> str:
    """A question that spells every special token of the tokenizer, `<image>` included."""
    return f"Is {IMAGE_PLACEHOLDER} an HTML tag? And {' or '.join(special_tokens(loaded))}?"


def prompt_ids(loaded: LoadedModel, question: str, num_images: int) -> list[int]:
    model = loaded.model
    conv = Conversation(
        [Message("user", user_content(question, num_images))], images=[""] * num_images
    )
    return encode_prompt(conv, loaded.built.tokenizer, model.image_token_id, model.tokens_per_image)


@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_typed_special_token_text_gives_no_special_ids(
    loaded: LoadedModel, num_images: int
) -> None:
    tok, model = loaded.built.tokenizer, loaded.model
    question = typed_prompt(loaded)
    ids = prompt_ids(loaded, question, num_images)
    special = {tok.convert_tokens_to_ids(t) for t in special_tokens(loaded)}
    found = [i for i in ids if i in special]
    # Only structure adds special ids: the round's BOS and the attached images' runs.
    image_run = [model.image_token_id] * (model.tokens_per_image * num_images)
    assert found == [tok.bos_token_id] + image_run
    # The text is all there, as plain characters: tokenised, not matched, not dropped.
    text = tok.decode([i for i in ids if i not in special], skip_special_tokens=False)
    assert f"Is {IMAGE_PLACEHOLDER} an HTML tag?" in text
    assert all(t in text for t in special_tokens(loaded))


def test_chat_prompt_with_image_text_and_no_image_runs(shapes: Path) -> None:
    """`dsvl chat MODEL --prompt 'Is <image> an HTML tag?'` answers (was: placeholder error)."""
    out = Console(file=io.StringIO(), width=200)
    code = run_chat(
        shapes / "export", [], "Is <image> an HTML tag?", SETTINGS, device="cpu", out=out
    )
    assert code == 0


def test_session_history_and_transcript_keep_typed_placeholders_as_text(
    loaded: LoadedModel, shapes: Path
) -> None:
    session = ChatSession.from_loaded(loaded, SETTINGS)
    first = session.ask("Is <image> an HTML tag?")
    second = session.ask("What about this <image>?", [shapes / "images" / "000000.png"])
    assert first.image_numbers == [] and second.image_numbers == [1]
    conv = session.conversation
    assert conv.messages[0].content == escape_typed("Is <image> an HTML tag?")
    assert conv.messages[2].content == "<image>\n" + escape_typed("What about this <image>?")
    conv.validate()  # one placeholder, one image: typed text counted nothing
    model, tok = loaded.model, loaded.built.tokenizer
    encoded = encode_conversation(conv, tok, model.image_token_id, model.tokens_per_image, None)
    assert encoded.input_ids == session.history_ids  # training rendering == what the model read
    again = Conversation.from_dict(session.transcript())
    assert again.messages == conv.messages
