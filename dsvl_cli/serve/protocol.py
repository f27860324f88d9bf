"""The OpenAI chat-completions request, checked, and turned into dsvl chat rounds.

A request's messages become a conversation as `dsvl chat` holds it: an optional first `system`
(or `developer`) message is the system prompt (absent: the model's default, as in training);
then `user` and `assistant` messages alternate and the last one is the user's question. A user
message's images (`image_url` parts) are that round's images, in order, placed before its text
as training places a round's `<image>` lines; its text parts are joined with newlines. Typed
text stays text (`<image>` or a special token's spelling in a message is never a slot or a
special token; `ChatSession` escapes it). Images are checked here (`images.read_image_ref`);
their pixels are decoded later, by the worker, and only for rounds no cached session holds.

Every problem is an `ApiError` carrying OpenAI's error JSON and an HTTP status.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dsvl_cli.serve.errors import ApiError
from dsvl_cli.serve.images import ImageRef, read_image_ref

if TYPE_CHECKING:
    from dsvl_cli.serve.options import ServeOptions

MAX_STOP = 4  # OpenAI's limit on stop sequences


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageUrl(_Strict):
    url: str
    detail: Literal["auto"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part]


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    """The accepted subset of OpenAI's chat-completions body; anything else is refused (400)."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None


@dataclass(frozen=True)
class Turn:
    """One round: the user's text and images, and the answer (None for the question asked)."""

    question: str
    images: tuple[ImageRef, ...]
    answer: str | None

    @property
    def key(self) -> tuple[str, tuple[str, ...], str | None]:
        """What identifies the round in the session cache (text as the session keeps it)."""
        answer = None if self.answer is None else self.answer.strip()
        return self.question.strip(), tuple(i.digest for i in self.images), answer


@dataclass(frozen=True)
class Completion:
    """A checked request: the conversation and how to answer it.

    Attributes:
        system: the system prompt (None: the model's default).
        history: finished rounds, oldest first.
        question: the round to answer (`answer` None).
        max_tokens: tokens to generate at most (None: the cap, or what the context leaves).
        temperature, top_p, seed: decoding (None: the server's defaults).
        stop: strings that end the answer.
        stream, include_usage: server-sent events; a last chunk with `usage`.
    """

    system: str | None
    history: tuple[Turn, ...]
    question: Turn
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool

    @property
    def num_images(self) -> int:
        return sum(len(t.images) for t in (*self.history, self.question))


def parse_completion(body: bytes, options: ServeOptions) -> Completion:
    """Check a request body and read its images' bytes; ApiError (400, 404) on any problem."""
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None
    try:
        req = ChatRequest.model_validate(raw)
    except ValidationError as err:
        raise _validation_error(err) from None
    if req.model != options.model_id:
        raise ApiError(
            404,
            f"model {req.model!r} is not served here; this server serves {options.model_id!r}",
            param="model",
            code="model_not_found",
        )
    return Completion(
        *_conversation(req.messages, options),
        max_tokens=_max_tokens(req, options.max_tokens),
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
        stop=_stops(req.stop),
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
    )


def _validation_error(err: ValidationError) -> ApiError:
    """The first problem pydantic found, as one line naming the field."""
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "not supported by this server (unknown or unsupported parameter)"
    more = f" (and {err.error_count() - 1} more problem(s))" if err.error_count() > 1 else ""
    return ApiError(400, f"{where}: {message}{more}", param=where)


def _max_tokens(req: ChatRequest, cap: int) -> int | None:
    given = {v for v in (req.max_tokens, req.max_completion_tokens) if v is not None}
    if len(given) > 1:
        raise ApiError(400, "max_tokens and max_completion_tokens differ; send one", "max_tokens")
    value = given.pop() if given else None
    if value is not None and value > cap:
        raise ApiError(
            400, f"max_tokens {value} is over this server's cap {cap} (--max-tokens)", "max_tokens"
        )
    return value


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise ApiError(400, f"stop: at most {MAX_STOP} non-empty strings", "stop")
    return tuple(stops)


def _text(content: str | list[Part], where: str, images_ok: bool) -> tuple[str, list[ImageUrl]]:
    if isinstance(content, str):
        return content, []
    texts = [p.text for p in content if isinstance(p, TextPart)]
    urls = [p.image_url for p in content if isinstance(p, ImagePart)]
    if urls and not images_ok:
        raise ApiError(400, f"{where}: only user messages may hold images", where)
    return "\n".join(texts), urls


def _conversation(
    messages: list[ChatMessage], options: ServeOptions
) -> tuple[str | None, tuple[Turn, ...], Turn]:
    """(system, history, question) from the messages (see the module docstring)."""
    system = None
    rest = list(enumerate(messages))
    if rest and rest[0][1].role in ("system", "developer"):
        system = _text(rest.pop(0)[1].content, "messages.0", images_ok=False)[0]
    turns: list[Turn] = []
    total_images = 0
    for i, msg in rest:
        where = f"messages.{i}"
        expected = "assistant" if turns and turns[-1].answer is None else "user"
        if msg.role != expected:
            raise ApiError(
                400,
                f"{where}: expected a {expected} message, got {msg.role} (after an optional "
                "first system message, user and assistant messages alternate, ending with user)",
                where,
            )
        text, urls = _text(msg.content, where, images_ok=msg.role == "user")
        if msg.role == "assistant":
            turns[-1] = Turn(turns[-1].question, turns[-1].images, text)
            continue
        if not text.strip() and not urls:
            raise ApiError(400, f"{where}: empty user message (no text, no image)", where)
        total_images += len(urls)
        if total_images > options.max_images:
            raise ApiError(
                400,
                f"too many images: more than {options.max_images} in this request (--max-images)",
                where,
                code="too_many_images",
            )
        refs = [
            read_image_ref(u.url, f"{where} image {k + 1}", options) for k, u in enumerate(urls)
        ]
        turns.append(Turn(text, tuple(refs), None))
    if not turns or turns[-1].answer is not None:
        raise ApiError(400, "messages: the last message must be the user's question", "messages")
    return system, tuple(turns[:-1]), turns[-1]
