"""The generation worker: one thread, a bounded queue, and a cache of finished conversations.

Concurrency: requests are parsed and their images checked on the web server's threads, then
queued (`Engine.submit`; at most `queue_size` waiting, 503 beyond); one worker thread answers
them one at a time, in arrival order. One at a time keeps memory flat (one KV cache growing
at a time) and every answer exactly what `dsvl chat` gives; `max_tokens` is capped, so the wait
is bounded: at most `queue_size` answers of at most the cap. A request whose client is gone
(`Job.cancel`) stops at the next token when it is running; one that is still waiting is skipped
when its turn comes (its queue place is free from then on, so a queue of clients that all left
drains in moments).

Prefix reuse: after each answer the session (`ChatSession`: history ids, KV cache, pixels)
goes into `SessionCache` keyed by the conversation it holds (system prompt + every round's
text, image digests and answer). A request whose history starts with a cached conversation
takes that session out and continues it: history rounds the session lacks are appended with
`ChatSession.add_round` and only the new ids (and their images) go through the model; the
cache keeps `cache_sessions` conversations, least recently used dropped first.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dsvl_cli.errors import DsvlError
from dsvl_cli.inference.generation import GenerationCancelled, GenerationSettings
from dsvl_cli.inference.session import ChatSession, Reply
from dsvl_cli.log import get_logger
from dsvl_cli.serve.errors import ApiError
from dsvl_cli.serve.images import decode_pixels

if TYPE_CHECKING:
    from dsvl_cli.data.encoder import SampleEncoder
    from dsvl_cli.inference.loader import LoadedModel
    from dsvl_cli.serve.options import ServeOptions
    from dsvl_cli.serve.protocol import Completion, Turn

log = get_logger(__name__)

Key = tuple[str | None, tuple[Any, ...]]


@dataclass
class Job:
    """One queued request and the way back to its handler (an asyncio queue of events).

    Events: ("start", None) once the round fits and generation begins, ("text", piece) while
    it generates, then ("done", Reply) or ("error", ApiError).
    """

    request: Completion
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, payload: Any = None) -> None:
        """Hand an event to the handler's loop (dropped if the loop has closed)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:
            self.cancel.set()


class SessionCache:
    """Finished sessions by the conversation they hold; least recently used dropped first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Key, ChatSession] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def take(self, system: str | None, rounds: list[Any]) -> tuple[ChatSession | None, int]:
        """Remove and return the session of the longest cached prefix of `rounds`; its length."""
        for n in range(len(rounds), 0, -1):
            session = self._items.pop((system, tuple(rounds[:n])), None)
            if session is not None:
                return session, n
        return None, 0

    def put(self, system: str | None, rounds: list[Any], session: ChatSession) -> None:
        if self.capacity == 0:
            return
        key = (system, tuple(rounds))
        self._items[key] = session
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)


class Engine:
    """The model, its worker thread and queue (see the module docstring)."""

    def __init__(self, loaded: LoadedModel, options: ServeOptions, encoder: SampleEncoder) -> None:
        self.loaded = loaded
        self.options = options
        self.encoder = encoder
        self.sessions = SessionCache(options.cache_sessions)
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=options.queue_size)
        self.running: Job | None = None
        self.stats = {"answered": 0, "failed": 0, "cancelled": 0, "skipped": 0, "reused_rounds": 0}
        self._thread = threading.Thread(target=self._loop, name="dsvl-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running answer and end the worker (waiting jobs are dropped)."""
        if self.running is not None:
            self.running.cancel.set()
        while True:
            try:
                self.jobs.get_nowait()
            except queue.Empty:
                break
        self.jobs.put(None)
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue `job`; ApiError 503 when `queue_size` jobs are already waiting."""
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(
                503,
                f"the server is busy: the queue is full ({self.options.queue_size} requests "
                "waiting, --queue-size); retry later",
                code="queue_full",
            ) from None

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancel.is_set():
                log.info("request skipped: its client left while it waited")
                self.stats["skipped"] += 1
                continue
            self.running = job
            try:
                self._answer(job)
                self.stats["answered"] += 1
            except GenerationCancelled:
                log.info("generation stopped: the client left")
                self.stats["cancelled"] += 1
            except Exception as err:  # the worker must outlive any one request
                self.stats["failed"] += 1
                job.emit("error", _api_error(err))
            finally:
                self.running = None

    def _answer(self, job: Job) -> None:
        req = job.request
        history = [t.key for t in req.history]
        session = self._session(req)
        question = req.question
        pixels = decode_pixels(question.images, self.encoder)
        session.configure(self._settings(session, req))
        job.emit("start")
        reply = session.ask(
            question.question,
            [i.label for i in question.images],
            lambda piece: job.emit("text", piece),
            pixels=pixels,
            stop=req.stop,
            cancelled=job.cancel.is_set,
        )
        answered = (question.key[0], question.key[1], reply.text)
        self.sessions.put(req.system, [*history, answered], session)
        job.emit("done", reply)

    def _session(self, req: Completion) -> ChatSession:
        """A session holding `req.history`: a cached one continued, or a new one."""
        session, kept = self.sessions.take(req.system, [t.key for t in req.history])
        if session is None:
            session = ChatSession(
                self.loaded.built,
                max_context=self.loaded.max_context,
                max_images=self.loaded.max_images,
                system=req.system,
                device=self.loaded.device,
                encoder=self.encoder,
            )
        self.stats["reused_rounds"] += kept
        for turn in req.history[kept:]:
            self._add(session, turn)
        return session

    def _add(self, session: ChatSession, turn: Turn) -> None:
        pixels = decode_pixels(turn.images, self.encoder)
        labels = [i.label for i in turn.images]
        session.add_round(turn.question, labels, turn.answer or "", pixels)

    def _settings(self, session: ChatSession, req: Completion) -> GenerationSettings:
        """The request's decoding settings; max_tokens checked against the context (400).

        Without max_tokens the answer may take the cap or what the context leaves, if less.
        """
        question = req.question
        session.check_images(len(question.images))
        prompt = session.next_prompt(question.question, len(question.images))
        used = len(session.history_ids) + len(prompt)
        limit = self.loaded.max_context
        wanted = req.max_tokens or min(self.options.max_tokens, limit - used)
        if wanted < 1 or used + wanted > limit:
            answer = f" + {wanted} to answer" if req.max_tokens else ", no room to answer"
            raise ApiError(
                400,
                f"context full: {used} tokens of conversation (images included){answer}; the "
                f"model takes {limit}: send fewer rounds or images, or a lower max_tokens",
                "messages",
                "context_length_exceeded",
            )
        return GenerationSettings(
            max_new_tokens=wanted,
            temperature=self.options.temperature if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            repetition_penalty=self.options.repetition_penalty,
            seed=0 if req.seed is None else req.seed,
        )


def _api_error(err: Exception) -> ApiError:
    """A failed request's error: its own, 400 for bad input (DsvlError), else 500 (logged)."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, DsvlError):
        return ApiError(400, str(err))
    log.error("request failed", exc_info=err)
    return ApiError(500, f"internal error: {type(err).__name__}: {err}")


def usage(reply: Reply) -> dict[str, Any]:
    """OpenAI's `usage`: prompt tokens (images included; cached ones counted apart) and answer."""
    prompt = reply.fed_tokens + reply.cached_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": reply.new_tokens,
        "total_tokens": prompt + reply.new_tokens,
        "prompt_tokens_details": {"cached_tokens": reply.cached_tokens},
    }
