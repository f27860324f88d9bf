"""`ServeOptions`: what `dsvl serve` listens on and the limits every request is held to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dsvl_cli.errors import ConfigError

DEFAULT_MAX_BODY = 20 * 1024 * 1024  # bytes: a few large base64 images
DEFAULT_MAX_TOKENS = 512
DEFAULT_QUEUE = 16
DEFAULT_CACHE = 8


@dataclass(frozen=True)
class ServeOptions:
    """Server settings (see `dsvl serve --help`).

    Attributes:
        model_id: the name clients send as `model` (and `GET /v1/models` lists).
        host, port: where to listen (port 0: any free port).
        api_key: required as `Authorization: Bearer KEY` on /v1/* (None: no key).
        image_root: the only folder `file://` images may come from (None: file:// refused).
        max_images: images one request may hold, all rounds together (None: the model's).
        max_body_bytes: request body limit (413 above).
        max_tokens: cap on a request's max_tokens, and the default without one.
        queue_size: requests that may wait for the generation worker (503 when full).
        cache_sessions: finished conversations kept for prefix reuse (0: none).
        temperature, repetition_penalty: decoding defaults (a request's temperature wins).
        ui: also serve the web chat page at ``/`` (`dsvl_cli.serve.ui`).
    """

    model_id: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    image_root: Path | None = None
    max_images: int | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY
    max_tokens: int = DEFAULT_MAX_TOKENS
    queue_size: int = DEFAULT_QUEUE
    cache_sessions: int = DEFAULT_CACHE
    temperature: float = 0.0
    repetition_penalty: float = 1.0
    ui: bool = False

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be >= {low} (got {value})"
            for name, value, low in (
                ("--port", self.port, 0),
                ("--max-images", self.max_images or 0, 0),
                ("--max-body-bytes", self.max_body_bytes, 1024),
                ("--max-tokens", self.max_tokens, 1),
                ("--queue-size", self.queue_size, 1),
                ("--cache-sessions", self.cache_sessions, 0),
            )
            if value < low
        ]
        if self.temperature < 0:
            problems.append(f"--temperature must be >= 0, 0 = greedy (got {self.temperature})")
        if self.repetition_penalty <= 0:
            problems.append(f"--repetition-penalty must be > 0 (got {self.repetition_penalty})")
        if self.api_key is not None and not self.api_key.strip():
            problems.append("--api-key is empty")
        if self.image_root is not None and not self.image_root.is_dir():
            problems.append(f"--image-root {self.image_root} is not a folder")
        if problems:
            raise ConfigError("dsvl serve: " + "; ".join(problems))
