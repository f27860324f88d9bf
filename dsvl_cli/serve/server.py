"""`dsvl serve`: load a model folder and serve it over HTTP with uvicorn.

The parts: `protocol.py` (the request, checked, as chat rounds), `images.py` (data: and file://
images), `engine.py` (the single generation worker, its bounded queue and the session cache
that gives prefix reuse: read its docstring for the concurrency design), `app.py` (routes,
errors, streaming), `stream.py` (streamed chunks). `BackgroundServer` runs the same app in a
thread on a free loopback port, for tests and benchmarks.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from dsvl_cli.data.encoder import SampleEncoder
from dsvl_cli.log import get_logger
from dsvl_cli.serve.app import create_app
from dsvl_cli.serve.engine import Engine

if TYPE_CHECKING:
    from fastapi import FastAPI

    from dsvl_cli.inference.loader import LoadedModel
    from dsvl_cli.serve.options import ServeOptions

log = get_logger(__name__)
GRACEFUL_S = 10  # seconds open streams get to finish when the server is stopped


def build_app(loaded: LoadedModel, options: ServeOptions) -> tuple[FastAPI, Engine]:
    """The app and its engine for a loaded model (the engine starts with the app).

    `options.max_images` None becomes the model's limit (`model.max_images_per_sample`).
    """
    if options.max_images is None:
        options = replace(options, max_images=loaded.max_images)
    encoder = SampleEncoder.from_built(loaded.built, loaded.config)
    engine = Engine(loaded, options, encoder)
    return create_app(engine, options), engine


def default_model_id(folder: Path) -> str:
    """`RUN/EXPORT` (e.g. "tiny/final"): the folder's parent and own name."""
    folder = folder.resolve()
    return f"{folder.parent.name}/{folder.name}" if folder.parent.name else folder.name


def run_server(
    folder: Path,
    options: ServeOptions,
    device: str = "auto",
    dtype: str = "auto",
    device_map: str | None = None,
    base_lm: Path | None = None,
    base_vision: Path | None = None,
) -> None:
    """Load `folder` (as `dsvl chat` does) and serve it until interrupted."""
    from dsvl_cli.inference.loader import load_for_inference

    loaded = load_for_inference(folder, device, dtype, device_map, base_lm, base_vision)
    app, _ = build_app(loaded, options)
    log.info(
        "serving %s as %r on http://%s:%d/v1 (queue %d, max_tokens cap %d, %s)",
        folder,
        options.model_id,
        options.host,
        options.port,
        options.queue_size,
        options.max_tokens,
        "API key required" if options.api_key else "no API key",
    )
    uvicorn.run(
        app,
        host=options.host,
        port=options.port,
        log_level="info",
        timeout_graceful_shutdown=GRACEFUL_S,
    )


class BackgroundServer:
    """The app served by uvicorn in a daemon thread on 127.0.0.1 and a free port.

    Use as a context manager; `url` is ``http://127.0.0.1:PORT``.
    """

    def __init__(self, app: FastAPI, start_timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.start_timeout = start_timeout

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
