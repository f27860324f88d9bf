"""The HTTP side: FastAPI routes in OpenAI's shapes over an `Engine`.

Routes: ``POST /v1/chat/completions`` (JSON, or server-sent events with `stream: true`: a first
chunk with the role, one chunk per text piece, a last chunk with `finish_reason`, an optional
usage chunk, then ``data: [DONE]``), ``GET /v1/models``, ``GET /health`` (no key needed),
and with `ui` the web chat page at ``GET /`` (`ui.py`).
Errors are OpenAI's JSON (`ApiError.body`) with their status, for every route and any input.

A request waits for its first worker event before the response starts, so an image that does not
decode or a conversation that does not fit is a 400, also when streaming. While it waits or
streams, the handler checks every `POLL_S` seconds whether the client is still there; when it
is gone, the job is cancelled (skipped in the queue, or stopped at the next token).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from dsvl_cli.serve.engine import Engine, Job, usage
from dsvl_cli.serve.errors import ApiError
from dsvl_cli.serve.protocol import parse_completion
from dsvl_cli.serve.stream import Deltas
from dsvl_cli.serve.ui import add_ui

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from dsvl_cli.inference.session import Reply
    from dsvl_cli.serve.options import ServeOptions

POLL_S = 0.2  # seconds between checks that the client is still connected
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


class BodyLimit:
    """ASGI middleware: 413 for a body over `max_bytes` (declared length or bytes received)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            status = 413 if declared.isdigit() else 400
            await JSONResponse(self._error(status).body(), status)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise self._error(413)
            return message

        await self.app(scope, limited, send)

    def _error(self, status: int) -> ApiError:
        if status == 400:
            return ApiError(400, "bad Content-Length header")
        return ApiError(
            413,
            f"request body over {self.max_bytes} bytes (--max-body-bytes); send smaller images",
            code="request_too_large",
        )


@dataclass(frozen=True)
class _Meta:
    id: str
    created: int
    model: str


def _key_check(options: ServeOptions) -> Callable[[Request], None]:
    expected = None if options.api_key is None else options.api_key.encode()

    def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise ApiError(
                401,
                "invalid API key: send the server's --api-key as 'Authorization: Bearer KEY'",
                code="invalid_api_key",
            )

    return check


async def _next_event(job: Job, request: Request) -> tuple[str, Any] | None:
    """The job's next event, or None (job cancelled) once the client has disconnected."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel.set()
                return None


def _completion(meta: _Meta, reply: Reply) -> dict[str, Any]:
    return {
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.text},
                "finish_reason": FINISH[reply.finish_reason],
                "logprobs": None,
            }
        ],
        "usage": usage(reply),
    }


def _chunk(meta: _Meta, choices: list[dict[str, Any]], **extra: Any) -> str:
    body = {
        "id": meta.id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        **extra,
    }
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _delta(meta: _Meta, delta: dict[str, str], finish: str | None = None) -> str:
    return _chunk(meta, [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}])


async def _sse(job: Job, request: Request, meta: _Meta) -> AsyncIterator[str]:
    """Server-sent events of one answer (see the module docstring); cancels the job on exit."""
    deltas = Deltas(job.request.stop)
    try:
        yield _delta(meta, {"role": "assistant", "content": ""})
        while (event := await _next_event(job, request)) is not None:
            kind, payload = event
            if kind == "text":
                if piece := deltas.add(payload):
                    yield _delta(meta, {"content": piece})
            elif kind == "error":
                yield f"data: {json.dumps(payload.body())}\n\n"
                return
            elif kind == "done":
                if rest := deltas.finish(payload.text):
                    yield _delta(meta, {"content": rest})
                yield _delta(meta, {}, FINISH[payload.finish_reason])
                if job.request.include_usage:
                    yield _chunk(meta, [], usage=usage(payload))
                yield "data: [DONE]\n\n"
                return
    finally:
        job.cancel.set()  # a client that left mid-stream: stop generating


async def _collect(job: Job, request: Request, meta: _Meta) -> Response:
    try:
        while (event := await _next_event(job, request)) is not None:
            kind, payload = event
            if kind == "error":
                raise payload
            if kind == "done":
                return JSONResponse(_completion(meta, payload))
        return Response(status_code=499)  # the client is gone; nobody reads this
    finally:
        job.cancel.set()


def create_app(engine: Engine, options: ServeOptions) -> FastAPI:
    """The server's FastAPI app; its lifespan starts and stops `engine`'s worker."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="dsvl", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=options.max_body_bytes)
    _errors(app)
    key = Depends(_key_check(options))
    _info_routes(app, engine, options, key)
    _chat_route(app, engine, options, key)
    if options.ui:
        add_ui(app, options)
    return app


def _info_routes(app: FastAPI, engine: Engine, options: ServeOptions, key: Any) -> None:
    """GET /health (no key) and GET /v1/models."""

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": options.model_id,
            "busy": engine.running is not None,
            "waiting": engine.jobs.qsize(),
            "queue_size": options.queue_size,
            "cached_sessions": len(engine.sessions),
            **engine.stats,
        }

    @app.get("/v1/models", dependencies=[key])
    async def models() -> dict[str, Any]:
        entry = {"id": options.model_id, "object": "model", "created": 0, "owned_by": "dsvl"}
        return {"object": "list", "data": [entry]}


def _chat_route(app: FastAPI, engine: Engine, options: ServeOptions, key: Any) -> None:
    """POST /v1/chat/completions (see the module docstring)."""

    @app.post("/v1/chat/completions", dependencies=[key])
    async def chat_completions(request: Request) -> Response:
        req = await run_in_threadpool(parse_completion, await request.body(), options)
        job = Job(req, asyncio.get_running_loop())
        engine.submit(job)
        try:
            first = await _next_event(job, request)
        except BaseException:  # the server is stopping: the worker need not answer
            job.cancel.set()
            raise
        if first is None:
            return Response(status_code=499)
        if first[0] == "error":
            raise first[1]
        meta = _Meta(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), options.model_id)
        if req.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(
                _sse(job, request, meta), headers=headers, media_type="text/event-stream"
            )
        return await _collect(job, request, meta)


def _errors(app: FastAPI) -> None:
    """Every error as OpenAI's JSON."""

    def api_error(_: Request, err: Exception) -> Awaitable[Response] | Response:
        assert isinstance(err, ApiError)
        return JSONResponse(err.body(), status_code=err.status)

    def http_error(_: Request, err: Exception) -> Response:
        assert isinstance(err, HTTPException)
        return JSONResponse(ApiError(err.status_code, str(err.detail)).body(), err.status_code)

    def validation_error(_: Request, err: Exception) -> Response:
        return JSONResponse(ApiError(400, f"bad request: {err}").body(), 400)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
