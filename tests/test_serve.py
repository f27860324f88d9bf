"""`dsvl serve`: a real uvicorn server on loopback, driven by the official `openai` client.

Answers equal `dsvl chat`'s (`ChatSession`) on the same conversation, streaming or not, with and
without prefix reuse; bad requests get OpenAI error JSON with the right status and the server
keeps serving.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from inference_helpers import make_export, steer  # noqa: E402

from dsvl_cli.bench.serve_common import data_url, user_message  # noqa: E402
from dsvl_cli.data.encoder import SampleEncoder  # noqa: E402
from dsvl_cli.inference.generation import GenerationSettings  # noqa: E402
from dsvl_cli.inference.loader import LoadedModel, load_for_inference  # noqa: E402
from dsvl_cli.inference.session import ChatSession  # noqa: E402
from dsvl_cli.serve.options import ServeOptions  # noqa: E402
from dsvl_cli.serve.server import BackgroundServer, build_app  # noqa: E402

KEY = "sk-test-key"
MAX_NEW = 8
SETTINGS = GenerationSettings(max_new_tokens=MAX_NEW, repetition_penalty=1.5)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_export(tmp_path_factory.mktemp("shapes"), max_images_per_sample=4)


@pytest.fixture(scope="module")
def loaded(shapes: Path) -> LoadedModel:
    return steer(load_for_inference(shapes / "export", device="cpu", dtype="fp32"))


@pytest.fixture(scope="module")
def server(loaded: LoadedModel, shapes: Path) -> Iterator[BackgroundServer]:
    options = ServeOptions(
        model_id="tiny",
        api_key=KEY,
        image_root=shapes / "images",
        max_tokens=64,
        max_body_bytes=200_000,
        repetition_penalty=SETTINGS.repetition_penalty,
    )
    app, _ = build_app(loaded, options)
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def image(shapes: Path, k: int) -> Path:
    return shapes / "images" / f"{k:06d}.png"


def ask(client: openai.OpenAI, messages: list[dict[str, Any]], stream: bool) -> tuple[str, Any]:
    """(answer, usage) of one request, streamed or not."""
    if not stream:
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_NEW)
        return r.choices[0].message.content or "", r.usage
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=MAX_NEW,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    return text, chunks[-1].usage


def chat_answers(loaded: LoadedModel, shapes: Path, system: str | None = None) -> list[str]:
    """What `dsvl chat` answers: two images, then a second round with a third one."""
    session = ChatSession(
        loaded.built,
        SETTINGS,
        max_context=loaded.max_context,
        system=system,
        encoder=SampleEncoder.from_built(loaded.built, loaded.config),
    )
    first = session.ask("Which image has the red shape?", [image(shapes, 0), image(shapes, 1)])
    second = session.ask("And this <image> one? </s>", [image(shapes, 2)])
    return [first.text, second.text]


def conversation(shapes: Path, first_answer: str | None) -> list[dict[str, Any]]:
    messages = [
        user_message(
            "Which image has the red shape?",
            [data_url(image(shapes, 0)), data_url(image(shapes, 1))],
        )
    ]
    if first_answer is not None:
        third = f"file://{image(shapes, 2)}"  # a file under --image-root
        messages += [
            {"role": "assistant", "content": first_answer},
            user_message("And this <image> one? </s>", [third]),
        ]
    return messages


@pytest.mark.parametrize("stream_first", [False, True])
def test_two_rounds_equal_chat_streaming_or_not(
    client: openai.OpenAI, loaded: LoadedModel, shapes: Path, stream_first: bool
) -> None:
    expected = chat_answers(loaded, shapes)
    first, usage1 = ask(client, conversation(shapes, None), stream=stream_first)
    assert first == expected[0]
    assert usage1.prompt_tokens_details.cached_tokens == 0
    second, usage2 = ask(client, conversation(shapes, first), stream=not stream_first)
    assert second == expected[1]
    # Prefix reuse: round 1 (its two images included) came from the cache.
    assert usage2.prompt_tokens_details.cached_tokens > loaded.model.tokens_per_image * 2
    assert usage2.prompt_tokens > usage2.prompt_tokens_details.cached_tokens
    # The same round again: its session was taken and extended, so this one starts fresh.
    again, usage3 = ask(client, conversation(shapes, first), stream=stream_first)
    assert again == second and usage3.prompt_tokens_details.cached_tokens == 0
    assert usage3.prompt_tokens == usage2.prompt_tokens


def test_system_prompt_and_history_not_generated_here(
    client: openai.OpenAI, loaded: LoadedModel, shapes: Path
) -> None:
    expected = chat_answers(loaded, shapes, system="Answer briefly.")
    system = {"role": "system", "content": "Answer briefly."}
    assert ask(client, [system, *conversation(shapes, None)], stream=False)[0] == expected[0]
    # A history answer the server never produced: rendered as training renders it.
    messages = [system, *conversation(shapes, expected[0])]
    assert ask(client, messages, stream=True)[0] == expected[1]


def test_history_longer_than_the_cached_conversation(
    client: openai.OpenAI, loaded: LoadedModel, shapes: Path
) -> None:
    """The cache holds round 1; a request with rounds 1-2 as history continues it: round 2 and
    its image are appended (not generated), only the new ids go through the model."""
    system = "Reuse test."
    session = ChatSession(
        loaded.built,
        SETTINGS,
        max_context=loaded.max_context,
        system=system,
        encoder=SampleEncoder.from_built(loaded.built, loaded.config),
    )
    turns = [
        ("Which image has the red shape?", [image(shapes, 0), image(shapes, 1)]),
        ("And this one?", [image(shapes, 2)]),
        ("What about the fourth?", [image(shapes, 3)]),
    ]
    expected = [session.ask(q, paths).text for q, paths in turns]
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
    first = [user_message(turns[0][0], [data_url(p) for p in turns[0][1]])]
    assert ask(client, messages + first, stream=False)[0] == expected[0]
    for (question, paths), answer in zip(turns[:2], expected[:2], strict=True):
        messages += [
            user_message(question, [data_url(p) for p in paths]),
            {"role": "assistant", "content": answer},
        ]
    messages.append(user_message(turns[2][0], [data_url(turns[2][1][0])]))
    third, used = ask(client, messages, stream=True)
    assert third == expected[2]
    cached = used.prompt_tokens_details.cached_tokens
    assert (
        2 * loaded.model.tokens_per_image
        < cached
        < len(session.history_ids) - len(session.rounds[-1].prompt_ids)
    )


def refused(client: openai.OpenAI, messages: list[dict[str, Any]], **extra: Any) -> Any:
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="tiny", messages=messages, **extra)
    return caught.value


def test_bad_images_are_400_and_the_server_keeps_serving(
    client: openai.OpenAI, shapes: Path, tmp_path: Path
) -> None:
    png = image(shapes, 0).read_bytes()
    truncated = "data:image/png;base64," + base64.b64encode(png[: len(png) // 2]).decode()
    err = refused(client, [user_message("What?", [truncated])])
    assert err.status_code == 400 and "messages.0 image 1: truncated" in err.body["message"]
    garbage = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    err = refused(client, [user_message("What?", [garbage])])
    assert err.status_code == 400 and "not a PNG, JPEG or WebP image" in err.body["message"]
    history = [
        user_message("What?", [truncated]),
        {"role": "assistant", "content": "red"},
        user_message("And now?", []),
    ]
    err = refused(client, history)  # a history image is decoded too (no session holds it)
    assert err.status_code == 400 and "messages.0 image 1: truncated" in err.body["message"]
    assert ask(client, conversation(shapes, None), stream=False)[0]  # still serving

    outside = tmp_path / "secret.png"
    outside.write_bytes(png)
    cases = {
        f"file://{outside}": "is outside --image-root",
        f"file://{shapes / 'images' / '..' / 'images' / '000000.png'}": "'..' is not allowed",
        "http://example.com/a.png": "remote images are not fetched",
        "https://example.com/a.png": "remote images are not fetched",
        "ftp://example.com/a.png": "unsupported image URL",
        "data:image/gif;base64,R0lGOD": "data:image/png|jpeg|webp;base64",
    }
    for url, message in cases.items():
        err = refused(client, [user_message("What?", [url])])
        assert err.status_code == 400 and message in err.body["message"], url
    symlink = shapes / "images" / "escape.png"
    symlink.symlink_to(outside)
    err = refused(client, [user_message("What?", [f"file://{symlink}"])])
    assert "outside --image-root" in err.body["message"]
    assert ask(client, conversation(shapes, None), stream=True)[0]


def test_bad_parameters_and_conversations(client: openai.OpenAI, shapes: Path) -> None:
    hi = [{"role": "user", "content": "Hi"}]
    answer_first = [{"role": "assistant", "content": "x"}]
    five = [user_message("What?", [data_url(image(shapes, k)) for k in range(5)])]
    cases: list[tuple[int, str, list[dict[str, Any]], dict[str, Any]]] = [
        (400, "over this server's cap 64", hi, {"max_tokens": 65}),
        (400, "n: Input should be less than or equal to 1", hi, {"n": 2}),
        (400, "logprobs: not supported", hi, {"logprobs": True}),
        (400, "temperature: Input should be less than or equal to 2", hi, {"temperature": 3}),
        (400, "too many images: more than 4", five, {}),
        (400, "context full", [{"role": "user", "content": "word " * 600}], {}),
        (400, "expected a user message, got assistant", answer_first, {}),
        (400, "last message must be the user's", [*hi, {"role": "assistant", "content": "x"}], {}),
        (400, "empty user message", [{"role": "user", "content": " "}], {}),
    ]
    for status, message, messages, extra in cases:
        err = refused(client, messages, **extra)
        assert err.status_code == status and message in err.body["message"], message
        assert set(err.body) == {"message", "type", "param", "code"}
    err = refused(client, [{"role": "user", "content": "word " * 600}])
    assert err.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError, match="serves 'tiny'"):
        client.chat.completions.create(model="gpt-4o", messages=hi)
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_api_key_body_limit_and_health(server: BackgroundServer, shapes: Path) -> None:
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key or "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="invalid API key"):
            bad.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}])
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get("/health").json()["status"] == "ok"  # no key needed
        r = http.post("/v1/chat/completions", json={"model": "tiny"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        auth = {"Authorization": f"Bearer {KEY}"}
        big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 300_000}]}
        r = http.post("/v1/chat/completions", json=big, headers=auth)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = http.post("/v1/chat/completions", content=b"{not json", headers=auth)
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        assert http.get("/nowhere").json()["error"]["message"] == "Not Found"
