"""`data.system_prompt`: one system prompt for conversations without their own, the same in
training, eval and chat (it travels in the export's config)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from inference_helpers import make_export

from dsvl_cli.config import validate_config
from dsvl_cli.data.conversation import Conversation, Message
from dsvl_cli.data.encoder import SampleEncoder
from dsvl_cli.data.template import SYSTEM_PROMPT
from dsvl_cli.inference.generation import GenerationSettings
from dsvl_cli.inference.loader import load_for_inference
from dsvl_cli.inference.session import ChatSession
from dsvl_cli.model.builder import build_model
from dsvl_cli.train.export import export_model

SHORT = "Answer about the shapes."


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_export(tmp_path_factory.mktemp("system prompt"))
    tree = {
        "model": {
            "language_model": str(root / "models/lm"),
            "vision": {"kind": "clip", "path": str(root / "models/vision")},
            "max_seq_len": 512,
        },
        "data": {"system_prompt": SHORT},
    }
    config = validate_config(tree)
    torch.manual_seed(0)
    built = build_model(config)
    export_model(built.model, built, config, root / "short", {"step": 0})
    return root


def conv(system: str | None = None) -> Conversation:
    messages = [Message("user", "<image>\nWhat colour is the square?"), Message("assistant", "red")]
    return Conversation(messages, ["images/000000.png"], id="c", system=system)


def test_the_encoders_prompt_replaces_the_default_only(shapes: Path) -> None:
    loaded = load_for_inference(shapes / "export", device="cpu", dtype="fp32")
    default = SampleEncoder.from_built(loaded.built, loaded.config)
    assert default.system_prompt is None
    short = replace(default, system_prompt=SHORT)
    empty = replace(default, system_prompt="")
    assert short.encode(conv()).input_ids == default.encode(conv(SHORT)).input_ids
    assert empty.encode(conv()).input_ids == default.encode(conv("")).input_ids
    lengths = [len(e.encode(conv()).input_ids) for e in (default, short, empty)]
    assert lengths[0] > lengths[1] > lengths[2]  # DSVL's prompt is the longest, "" renders none
    own = conv("My own prompt.")  # a conversation's own system prompt wins
    assert short.encode(own).input_ids == default.encode(own).input_ids
    assert short.prompt(Conversation(conv().messages[:1], conv().images)) == default.prompt(
        Conversation(conv(SHORT).messages[:1], conv().images, system=SHORT)
    )


def test_the_prompt_travels_with_the_export_into_chat_and_eval(shapes: Path) -> None:
    loaded = load_for_inference(shapes / "short", device="cpu", dtype="fp32")
    assert loaded.config.data.system_prompt == SHORT
    encoder = SampleEncoder.from_built(loaded.built, loaded.config)  # eval's encoder
    assert encoder.system_prompt == SHORT
    session = ChatSession.from_loaded(loaded, GenerationSettings(max_new_tokens=2))
    session.ask("What colour is the square?", [shapes / "images/000000.png"])
    prompt = session.rounds[0].prompt_ids
    text = loaded.built.tokenizer.decode(prompt)
    assert text.startswith("<s>" + SHORT) and SYSTEM_PROMPT.strip() not in text
    assert prompt == encoder.last_question(conv())  # chat and scoring agree
