"""One sample encoder: training, chat, scoring and `--show` turn a conversation into the same
ids, labels and pixels, through `SampleEncoder`."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from inference_helpers import make_export, steer  # noqa: E402

from dsvl_cli.data.conversation import Conversation, Message  # noqa: E402
from dsvl_cli.data.dataset import ConversationDataset  # noqa: E402
from dsvl_cli.data.encoder import (  # noqa: E402
    Sample,
    SampleEncoder,
    SkippedSample,
    supervision_pieces,
    user_content,
)
from dsvl_cli.data.show import show_samples  # noqa: E402
from dsvl_cli.data.template import IGNORE_INDEX, Encoded  # noqa: E402
from dsvl_cli.inference.generation import GenerationSettings  # noqa: E402
from dsvl_cli.inference.loader import LoadedModel, load_for_inference  # noqa: E402
from dsvl_cli.inference.session import ChatSession  # noqa: E402

SETTINGS = GenerationSettings(max_new_tokens=4)
QUESTION = "What colour is the square? Not <image>, typed."
IMAGES = ["images/000000.png", "images/000001.png"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_export(tmp_path_factory.mktemp("encoder"))


@pytest.fixture(scope="module")
def loaded(shapes: Path) -> LoadedModel:
    return steer(load_for_inference(shapes / "export", device="cpu", dtype="fp32"))


def conversation() -> Conversation:
    """One round with two images, its user message written as the chat path writes it."""
    messages = [Message("user", user_content(QUESTION, 2)), Message("assistant", "red")]
    return Conversation(messages, list(IMAGES), id="one")


@pytest.fixture()
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the encoder's entry points, to show every path goes through them."""
    counts: dict[str, int] = {"encode": 0, "prompt": 0, "pixels": 0}
    for name in counts:
        original = getattr(SampleEncoder, name)

        def spy(self: SampleEncoder, *args: Any, _name: str = name, _f: Any = original, **kw: Any):
            counts[_name] += 1
            return _f(self, *args, **kw)

        monkeypatch.setattr(SampleEncoder, name, spy)
    return counts


def test_dataset_chat_and_show_give_the_same_input(
    loaded: LoadedModel, shapes: Path, tmp_path: Path, calls: dict[str, int]
) -> None:
    encoder = SampleEncoder.from_built(loaded.built, loaded.config)
    conv = conversation()

    sample = ConversationDataset([conv], shapes, encoder)[0]  # training
    assert isinstance(sample, Sample) and sample.num_images == 2
    assert calls == {"encode": 1, "prompt": 0, "pixels": 1}

    session = ChatSession.from_loaded(loaded, SETTINGS)  # chat and eval
    session.ask(QUESTION, [shapes / p for p in IMAGES])
    prompt = session.rounds[0].prompt_ids
    assert calls["prompt"] == 1 and calls["pixels"] == 2
    assert sample.input_ids[: len(prompt)].tolist() == prompt
    supervised = (sample.labels != IGNORE_INDEX).nonzero()
    assert int(supervised[0]) == len(prompt)  # the answer starts where the chat prompt ends
    assert torch.equal(session.rounds[0].pixels, sample.pixel_values)
    assert encoder.last_question(conv) == prompt  # scoring's prompt

    jsonl = tmp_path / "one.jsonl"
    jsonl.write_text(json.dumps(conv.to_dict()) + "\n", encoding="utf-8")
    out = io.StringIO()
    show_samples(jsonl, 1, Console(file=out, width=10_000), encoder)  # --show
    assert calls["encode"] == 2
    encoded = Encoded(sample.input_ids.tolist(), sample.labels.tolist(), 2, 1)
    pieces = supervision_pieces(encoded, encoder.tokenizer, encoder.image_token_id)
    assert encoder.supervision(conv) == pieces
    assert "".join(text for text, _ in pieces) in out.getvalue()
    assert "Not <image>, typed." in out.getvalue()  # typed text stays text everywhere
    # `--show --tokenizer` (no model: one token per image) shows the same text.
    text_only = SampleEncoder.for_text(encoder.tokenizer).supervision(conv)
    assert text_only == pieces


def test_image_failures_are_skips_with_the_loaders_reason(
    loaded: LoadedModel, shapes: Path
) -> None:
    encoder = SampleEncoder.from_built(loaded.built, loaded.config)
    conv = conversation()
    missing = Conversation(conv.messages, ["images/gone.png", IMAGES[1]], id="gone")
    remote = Conversation(conv.messages, ["https://example.com/a.png", IMAGES[1]], id="far")
    assert encoder.sample(missing, shapes) == SkippedSample(
        "gone", "image_missing", encoder.sample(missing, shapes).detail
    )
    assert encoder.sample(remote, shapes).reason == "remote_image"
    assert encoder.pixels([]).shape == (0, *encoder.image_shape)


def test_dataset_takes_an_encoder_or_its_settings_not_both(loaded: LoadedModel) -> None:
    encoder = SampleEncoder.from_built(loaded.built)
    with pytest.raises(TypeError):
        ConversationDataset([], ".", encoder, max_seq_len=8)
    with pytest.raises(ValueError, match="no image transform"):
        SampleEncoder.for_text(encoder.tokenizer).pixels(IMAGES)
