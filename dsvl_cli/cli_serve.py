"""`dsvl serve`: an OpenAI-compatible chat-completions server for a model folder.

Registered on the main app in dsvl_cli/cli.py; the library side is dsvl_cli/serve/.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer

from dsvl_cli.serve.options import (
    DEFAULT_CACHE,
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_TOKENS,
    DEFAULT_QUEUE,
)

MODEL_OPT = typer.Argument(
    None,
    help="Model folder: an export or a fused folder (default: the newest under ./outputs).",
)
UI_OPT = typer.Option(False, "--ui", help="Also serve a web chat page at / (images, rounds).")
HOST_OPT = typer.Option("127.0.0.1", "--host", help="Address to listen on.")
PORT_OPT = typer.Option(8000, "--port", help="Port to listen on.")
API_KEY_OPT = typer.Option(
    None,
    "--api-key",
    envvar="DSVL_API_KEY",
    help="Require 'Authorization: Bearer KEY' on /v1/* (or set DSVL_API_KEY).",
)
IMAGE_ROOT_OPT = typer.Option(
    None,
    "--image-root",
    help="Allow file:// images, only under this folder (default: file:// refused).",
)
MODEL_NAME_OPT = typer.Option(
    None,
    "--model-name",
    help="The model id clients send (default: RUN/EXPORT, e.g. tiny/final).",
)
MAX_IMAGES_OPT = typer.Option(
    None, "--max-images", help="Images per request, all rounds (default: the model's limit)."
)
MAX_BODY_BYTES_OPT = typer.Option(
    DEFAULT_MAX_BODY, "--max-body-bytes", help="Request body limit in bytes (413 above)."
)
MAX_TOKENS_OPT = typer.Option(
    DEFAULT_MAX_TOKENS, "--max-tokens", help="Cap on a request's max_tokens (and its default)."
)
QUEUE_SIZE_OPT = typer.Option(
    DEFAULT_QUEUE, "--queue-size", help="Requests that may wait (503 when full)."
)
CACHE_SESSIONS_OPT = typer.Option(
    DEFAULT_CACHE, "--cache-sessions", help="Finished conversations kept for prefix reuse."
)
TEMPERATURE_OPT = typer.Option(
    0.0, "--temperature", help="Default when a request sends none (0 = greedy)."
)
REPETITION_PENALTY_OPT = typer.Option(1.0, "--repetition-penalty", help="1.0 = off.")
DEVICE_OPT = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N.")
DTYPE_OPT = typer.Option("auto", "--dtype", help="auto | fp32 | bf16 | fp16.")
DEVICE_MAP_OPT = typer.Option(
    None, "--device-map", help="Spread over GPUs: auto|balanced|sequential."
)
BASE_LM_OPT = typer.Option(
    None, "--base-lm", help="An export's base LM folder here (replaces model.language_model)."
)
BASE_VISION_OPT = typer.Option(
    None, "--base-vision", help="An export's vision encoder here (replaces model.vision.path)."
)


def serve_cmd(
    model: Path | None = MODEL_OPT,
    host: str = HOST_OPT,
    port: int = PORT_OPT,
    api_key: str | None = API_KEY_OPT,
    image_root: Path | None = IMAGE_ROOT_OPT,
    model_name: str | None = MODEL_NAME_OPT,
    max_images: int | None = MAX_IMAGES_OPT,
    max_body_bytes: int = MAX_BODY_BYTES_OPT,
    max_tokens: int = MAX_TOKENS_OPT,
    queue_size: int = QUEUE_SIZE_OPT,
    cache_sessions: int = CACHE_SESSIONS_OPT,
    temperature: float = TEMPERATURE_OPT,
    repetition_penalty: float = REPETITION_PENALTY_OPT,
    device: str = DEVICE_OPT,
    dtype: str = DTYPE_OPT,
    device_map: str | None = DEVICE_MAP_OPT,
    base_lm: Path | None = BASE_LM_OPT,
    base_vision: Path | None = BASE_VISION_OPT,
    ui: bool = UI_OPT,
) -> None:
    """Serve a model over HTTP: OpenAI's /v1/chat/completions (images, rounds, streaming)."""
    from dsvl_cli.model.discovery import model_or_newest
    from dsvl_cli.serve.options import ServeOptions

    options = ServeOptions(
        model_id=model_name or "",
        host=host,
        port=port,
        api_key=api_key,
        image_root=image_root,
        max_images=max_images,
        max_body_bytes=max_body_bytes,
        max_tokens=max_tokens,
        queue_size=queue_size,
        cache_sessions=cache_sessions,
        temperature=temperature,
        repetition_penalty=repetition_penalty,
        ui=ui,
    )  # bad options: one line, before anything loads
    model = model_or_newest(model)  # before the heavy imports: no model found is instant
    from dsvl_cli.serve.server import default_model_id, run_server

    if not model_name:
        options = replace(options, model_id=default_model_id(model))
    run_server(model, options, device, dtype, device_map, base_lm, base_vision)
