"""ChatSession: KV-cache reuse, training-identical history, numbering, overflow, settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from inference_helpers import make_export, steer  # noqa: E402

from dsvl_cli.data.conversation import Conversation, Message  # noqa: E402
from dsvl_cli.data.images import ImageLoadError  # noqa: E402
from dsvl_cli.data.template import encode_conversation, encode_prompt  # noqa: E402
from dsvl_cli.errors import ConfigError, DataError  # noqa: E402
from dsvl_cli.inference.generation import GenerationSettings  # noqa: E402
from dsvl_cli.inference.loader import (  # noqa: E402
    LoadedModel,
    _pin_to_embeddings,
    load_for_inference,
    resolve_dtype,
)
from dsvl_cli.inference.session import ChatSession, ContextOverflow, user_content  # noqa: E402

SETTINGS = GenerationSettings(max_new_tokens=8, repetition_penalty=1.5)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_export(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def loaded(shapes: Path) -> LoadedModel:
    return steer(load_for_inference(shapes / "export", device="cpu", dtype="fp32"))


def image(shapes: Path, k: int) -> Path:
    return shapes / "images" / f"{k:06d}.png"


def fresh_answer(loaded: LoadedModel, conv: Conversation) -> tuple[str, str]:
    """Answer the open conversation by re-encoding everything (no cache): (text, finish)."""
    model, tok = loaded.model, loaded.built.tokenizer
    ids = torch.tensor([encode_prompt(conv, tok, model.image_token_id, model.tokens_per_image)])
    pixels = ChatSession(loaded.built).load_pixels(conv.images)
    torch.manual_seed(SETTINGS.seed)
    out = model.generate(
        input_ids=ids,
        pixel_values=pixels if len(conv.images) else None,
        generation_config=SETTINGS.generation_config(tok),
    )
    new = out.sequences[0, ids.shape[1] :].tolist()
    finish = "eos" if tok.eos_token_id in new else "length"
    new = new[: new.index(tok.eos_token_id)] if finish == "eos" else new
    return tok.decode(new, skip_special_tokens=True).strip(), finish


TURNS = [
    ("What colour is the square?", [0]),
    ("And these two?", [1, 2]),
    ("Which shape is red?", []),
    ("Why?", []),
]


def test_cache_reuse_equals_reencoding_and_history_is_training_rendering(
    loaded: LoadedModel, shapes: Path
) -> None:
    session = ChatSession.from_loaded(loaded, SETTINGS)
    numbers, finishes, repaired = [], set(), 0
    for question, ks in TURNS:
        paths = [str(image(shapes, k)) for k in ks]
        before = session.conversation
        open_conv = Conversation(
            [*before.messages, Message("user", user_content(question, len(paths)))],
            before.images + paths,
        )
        expected = fresh_answer(loaded, open_conv)
        history_before = len(session.history_ids)
        reply = session.ask(question, paths)
        assert (reply.text, reply.finish_reason) == expected
        numbers.append(reply.image_numbers)
        finishes.add(reply.finish_reason)
        if history_before:  # only the uncached tail and the new round went through the model
            assert reply.cached_tokens > 0
            assert reply.fed_tokens == history_before - reply.cached_tokens + (
                len(session.rounds[-1].prompt_ids)
            )
            repaired += reply.cached_tokens < history_before - 1
    assert numbers == [[1], [2, 3], [], []]
    assert finishes == {"eos", "length"}  # both ways of ending a round were exercised
    assert repaired >= 1  # at least one cache was cropped to the canonical answer ids
    tok, model = loaded.built.tokenizer, loaded.model
    encoded = encode_conversation(
        session.conversation, tok, model.image_token_id, model.tokens_per_image, None
    )
    assert session.history_ids == encoded.input_ids
    assert "### Image 3:" in tok.decode(session.history_ids)


def test_images_are_encoded_once(loaded: LoadedModel, shapes: Path) -> None:
    seen: list[int] = []
    hook = loaded.model.vision.register_forward_hook(lambda m, args, out: seen.append(len(args[0])))
    try:
        session = ChatSession.from_loaded(loaded, SETTINGS)
        for question, ks in TURNS:
            session.ask(question, [image(shapes, k) for k in ks])
    finally:
        hook.remove()
    assert seen == [1, 2]  # one vision pass per round that brings images, new images only


def test_interrupted_round_leaves_the_session_intact(loaded: LoadedModel, shapes: Path) -> None:
    reference = ChatSession.from_loaded(loaded, SETTINGS)
    session = ChatSession.from_loaded(loaded, SETTINGS)
    for s in (reference, session):
        s.ask("What colour is the square?", [image(shapes, 0)])
    history = list(session.history_ids)

    def interrupt(piece: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        session.ask("And these two?", [image(shapes, 1), image(shapes, 2)], on_text=interrupt)
    assert session.history_ids == history and len(session.rounds) == 1
    assert session.cached_tokens == 0  # the half-extended cache was discarded
    again = session.ask("And these two?", [image(shapes, 1), image(shapes, 2)])
    expected = reference.ask("And these two?", [image(shapes, 1), image(shapes, 2)])
    assert again.text == expected.text and again.image_numbers == [2, 3]
    assert session.history_ids == reference.history_ids


def test_streamed_pieces_make_the_answer(loaded: LoadedModel, shapes: Path) -> None:
    # Favour the space-led words, so the random model's answer has several words to stream
    # (left alone it may answer one run of letters, "squareblue....", a single piece).
    head, tok = loaded.model.get_output_embeddings(), loaded.built.tokenizer
    saved = head.bias.detach().clone()
    with torch.no_grad():
        for word in (" the", " first", " second", " circle", " square"):
            head.bias[tok(word, add_special_tokens=False)["input_ids"]] += 3.0
    try:
        session = ChatSession.from_loaded(loaded, SETTINGS)
        session.ask("What colour is the square?", [image(shapes, 0)])
        pieces: list[str] = []
        reply = session.ask("And these two?", [image(shapes, 1), image(shapes, 2)], pieces.append)
    finally:
        with torch.no_grad():
            head.bias.copy_(saved)
    assert len(pieces) >= 2 and "".join(pieces).strip() == reply.text != ""


def test_overflow_error_keeps_the_session(loaded: LoadedModel, shapes: Path) -> None:
    session = ChatSession(loaded.built, SETTINGS, max_context=120)
    session.ask("What colour is the square?", [image(shapes, 0)])
    history = list(session.history_ids)
    with pytest.raises(ContextOverflow, match=r"context full: .* > 120; /clear"):
        session.ask("And these two?", [image(shapes, 1), image(shapes, 2)])
    assert session.history_ids == history and session.images == [str(image(shapes, 0))]
    session.clear()
    assert session.ask("Hi", []).image_numbers == [] and len(session.rounds) == 1


def test_drop_oldest_renders_the_rest_as_a_fresh_conversation(
    loaded: LoadedModel, shapes: Path
) -> None:
    session = ChatSession(loaded.built, SETTINGS, max_context=140, overflow="drop_oldest")
    session.ask("What colour is the square?", [image(shapes, 0)])
    session.ask("And this one?", [image(shapes, 1)])
    reply = session.ask("And the last?", [image(shapes, 2)])
    assert reply.dropped_rounds == session.dropped_rounds == 1
    assert session.images == [str(image(shapes, 1)), str(image(shapes, 2))]
    assert reply.image_numbers == [2]  # numbering restarted: image 1 is now the old image 2
    tok, model = loaded.built.tokenizer, loaded.model
    encoded = encode_conversation(
        session.conversation, tok, model.image_token_id, model.tokens_per_image, None
    )
    assert session.history_ids == encoded.input_ids
    assert tok.decode(session.history_ids).count("### Image 1:") == 1
    assert len(session.history_ids) <= 140 + 1  # room was made for max_new_tokens (+ EOS)
    # An interrupted round that needed a drop leaves the conversation and its cache as they were.
    rounds, history, cached = list(session.rounds), list(session.history_ids), session.cached_tokens

    def interrupt(piece: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        session.ask("One more?", [image(shapes, 3)], on_text=interrupt)
    assert (session.rounds, session.history_ids) == (rounds, history)
    assert session.cached_tokens == cached > 0 and session.dropped_rounds == 1
    assert session.ask("One more?", [image(shapes, 3)]).dropped_rounds >= 1
    # A round that cannot fit even alone is refused, not cropped.
    tiny = ChatSession(loaded.built, SETTINGS, max_context=20, overflow="drop_oldest")
    with pytest.raises(ContextOverflow):
        tiny.ask("What colour is the square?", [image(shapes, 0)])


def test_bad_images_and_limits(loaded: LoadedModel, shapes: Path, tmp_path: Path) -> None:
    session = ChatSession.from_loaded(loaded, SETTINGS)
    session.max_images = 2
    session.ask("What colour?", [image(shapes, 0)])
    with pytest.raises(DataError, match="too many images: .* 3, .* at most 2"):
        session.ask("And these?", [image(shapes, 1), image(shapes, 2)])
    with pytest.raises(ImageLoadError, match="missing"):
        session.ask("And this?", [tmp_path / "nope.png"])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageLoadError, match="unreadable"):
        session.ask("And this?", [tmp_path / "bad.png"])
    with pytest.raises(DataError, match="empty question"):
        session.ask("  ", [])
    assert len(session.rounds) == 1 and session.images == [str(image(shapes, 0))]


def test_settings_are_explicit_and_seeded(loaded: LoadedModel, shapes: Path) -> None:
    config = GenerationSettings().generation_config(loaded.built.tokenizer)
    assert (config.do_sample, config.max_new_tokens, config.repetition_penalty) == (False, 256, 1.0)
    assert "greedy" in GenerationSettings().describe()
    greedy = ChatSession.from_loaded(loaded, SETTINGS).ask("Hi", [image(shapes, 0)]).text
    # A sampling generation config on the model (as an LM's generation_config.json would
    # bring) changes nothing: the session's settings are complete.
    loaded.model.generation_config.do_sample = True
    loaded.model.generation_config.temperature = 50.0
    try:
        assert (
            ChatSession.from_loaded(loaded, SETTINGS).ask("Hi", [image(shapes, 0)]).text == greedy
        )
    finally:
        loaded.model.generation_config.do_sample = False
        loaded.model.generation_config.temperature = None
    sampling = GenerationSettings(max_new_tokens=8, temperature=1.5, top_k=20, seed=7)
    runs = [ChatSession.from_loaded(loaded, sampling).ask("Hi", []).text for _ in range(2)]
    assert runs[0] == runs[1]
    with pytest.raises(ConfigError, match="top_p must be in .*; top_k must be >= 0"):
        GenerationSettings(top_p=0.0, top_k=-1)
    with pytest.raises(ConfigError, match="overflow"):
        ChatSession(loaded.built, overflow="crop")  # type: ignore[arg-type]


def test_save_writes_a_transcript_with_image_paths(
    loaded: LoadedModel, shapes: Path, tmp_path: Path
) -> None:
    session = ChatSession.from_loaded(loaded, SETTINGS)
    session.ask("What colour?", [image(shapes, 0)])
    session.ask("And these?", [image(shapes, 1), image(shapes, 2)])
    path = session.save(tmp_path / "sub" / "t.json", model_folder=shapes / "export")
    record = json.loads(path.read_text(encoding="utf-8"))
    assert record["images"] == [str(image(shapes, k)) for k in range(3)]
    assert record["generation"]["max_new_tokens"] == 8 and record["model"].endswith("export")
    conv = Conversation.from_dict(record)
    assert conv.messages[2].content == "<image>\n<image>\nAnd these?"
    assert conv.messages[3].content == session.rounds[1].answer
    with pytest.raises(DataError, match="cannot write transcript"):
        session.save(tmp_path / "sub" / "t.json" / "x.json")


def test_loader_choices_and_device_map_pinning(loaded: LoadedModel) -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ConfigError, match="--dtype 'fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))
    with pytest.raises(ConfigError, match="--device-map 'everywhere'"):
        load_for_inference("unused", device_map="everywhere")
    assert loaded.max_context == 512 and loaded.max_images == 8
    planned = {
        "vision.encoder.layers.0": 1,
        "vision.encoder.layers.1": 0,
        "mm_projector": 0,
        "language_model.model": 1,
        "language_model.lm_head": 0,
    }
    pinned = _pin_to_embeddings(loaded.model, planned)
    assert pinned == {
        "language_model.model": 1,
        "language_model.lm_head": 0,
        "vision": 1,
        "mm_projector": 1,
    }
