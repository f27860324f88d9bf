"""Images of a request: `data:` URLs and `file://` under `--image-root`, checked, then decoded.

Accepted: ``data:image/png|jpeg|webp;base64,...`` (the bytes must be of the declared type) and,
only when the server has `--image-root`, ``file:///abs/path`` naming a file under that folder
(no ``..`` component; symbolic links are followed and must stay inside). ``http(s)://`` is
refused: the server never uses the network. Checks that need no decoding happen when the
request arrives (`read_image_ref`: URL form, file type by its first bytes, pixel count from the
header, at most `MAX_PIXELS`), so a bad image is a 400 before the request is queued.

Decoding (`decode_pixels`, in the worker) goes through the one image loader and the model's
transform (`SampleEncoder.pixels`), exactly as chat and training do; a `data:` image is written
to a private temporary file for it. An image's identity is the SHA-256 of its bytes, so the same
image sent again (as a data URL or a file) matches a cached session.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

import torch
from PIL import Image

from dsvl_cli.data.image_refs import ImageRefError
from dsvl_cli.data.images import ImageLoadError
from dsvl_cli.serve.errors import ApiError

if TYPE_CHECKING:
    from dsvl_cli.data.encoder import SampleEncoder
    from dsvl_cli.serve.options import ServeOptions

# Decoded size limit: ~120 MB as 8-bit RGB (the loader's own cap is 4x higher).
MAX_PIXELS = 40_000_000
FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
_DATA_URL = re.compile(r"^data:image/([a-zA-Z]+);base64,", re.ASCII)


@dataclass(frozen=True)
class ImageRef:
    """One checked image: its bytes (data URL) or its file, and its SHA-256 hex digest."""

    digest: str
    label: str
    where: str
    data: bytes | None = None
    path: Path | None = None


def _signature(data: bytes) -> str | None:
    """The Pillow format name from the first bytes (PNG, JPEG, WEBP), else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _check_bytes(data: bytes, where: str, declared: str | None) -> None:
    """Type by signature (and as declared), pixel count from the header; ApiError 400."""
    kind = _signature(data)
    if kind is None:
        raise ApiError(400, f"{where}: not a PNG, JPEG or WebP image", where, "invalid_image")
    if declared is not None and kind != declared:
        raise ApiError(400, f"{where}: declared {declared} but the bytes are {kind}", where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ApiError(
            400, f"{where}: undecodable {kind} ({err})", where, "invalid_image"
        ) from None
    if width * height > MAX_PIXELS:
        raise ApiError(
            400,
            f"{where}: {width}x{height} pixels, over the limit {MAX_PIXELS}",
            where,
            "too_large",
        )


def _data_url(url: str, where: str) -> ImageRef:
    match = _DATA_URL.match(url)
    subtype = match.group(1).lower() if match else ""
    if subtype not in FORMATS:
        raise ApiError(
            400,
            f"{where}: a data URL must be data:image/png|jpeg|webp;base64,... (got {url[:40]!r})",
            where,
            "invalid_image",
        )
    try:
        data = base64.b64decode(url[match.end() :], validate=True)  # type: ignore[union-attr]
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: the data URL is not valid base64", where) from None
    _check_bytes(data, where, FORMATS[subtype])
    digest = hashlib.sha256(data).hexdigest()
    return ImageRef(digest, f"data:image/{subtype} sha256:{digest[:12]}", where, data=data)


def _file_url(url: str, where: str, options: ServeOptions) -> ImageRef:
    root = options.image_root
    if root is None:
        raise ApiError(
            400, f"{where}: file:// images are off; start the server with --image-root DIR", where
        )
    parts = urlsplit(url)
    if parts.netloc.lower() not in ("", "localhost"):
        raise ApiError(400, f"{where}: file:// URL on another host ({parts.netloc})", where)
    path = PurePath(unquote(parts.path))
    if ".." in path.parts:
        raise ApiError(400, f"{where}: '..' is not allowed in a file:// path", where)
    if not path.is_absolute():
        raise ApiError(400, f"{where}: a file:// URL needs an absolute path", where)
    real, top = Path(path).resolve(), root.resolve()
    if real != top and top not in real.parents:
        raise ApiError(400, f"{where}: {path} is outside --image-root {root}", where)
    if not real.is_file():
        raise ApiError(400, f"{where}: {path} is not a file under --image-root", where)
    if real.stat().st_size > options.max_body_bytes:
        raise ApiError(400, f"{where}: {path} is larger than --max-body-bytes", where, "too_large")
    data = real.read_bytes()
    _check_bytes(data, where, None)
    return ImageRef(hashlib.sha256(data).hexdigest(), str(path), where, path=real)


def read_image_ref(url: str, where: str, options: ServeOptions) -> ImageRef:
    """Check one `image_url` (see the module docstring); ApiError 400 on any problem."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _data_url(url, where)
    if scheme == "file":
        return _file_url(url, where, options)
    if scheme in ("http", "https"):
        raise ApiError(
            400,
            f"{where}: remote images are not fetched (the server uses no network); send the "
            "image as a data: URL (base64)",
            where,
            "remote_image",
        )
    raise ApiError(400, f"{where}: unsupported image URL {url[:40]!r}; use a data: URL", where)


def decode_pixels(refs: tuple[ImageRef, ...], encoder: SampleEncoder) -> torch.Tensor:
    """[n, 3, H, W] pixels of `refs` through `encoder.pixels`; ApiError 400 if one fails."""
    tensors = [_decode(ref, encoder) for ref in refs]
    return torch.cat(tensors) if tensors else torch.zeros(0, *encoder.image_shape)


def _decode(ref: ImageRef, encoder: SampleEncoder) -> torch.Tensor:
    try:
        if ref.path is not None:
            return encoder.pixels([ref.path])
        assert ref.data is not None
        with tempfile.NamedTemporaryFile(prefix="dsvl-serve-", suffix=".img") as tmp:
            tmp.write(ref.data)
            tmp.flush()
            return encoder.pixels([tmp.name])
    except (ImageLoadError, ImageRefError) as err:
        detail = str(err).split(": ", 1)[-1]
        raise ApiError(400, f"{ref.where}: {detail}", ref.where, "invalid_image") from None
