"""Image files -> RGB PIL images, with every failure named by a machine-readable reason.

`load_image` is what training, eval and chat call (through `encoder.SampleEncoder.pixels` and
`image_refs.find_image`); `check_image` is what `prepare-data` calls once per image. Both fully
decode the file (`Image.load()`), so a truncated JPEG fails here, at a known path, and not later
inside a vision encoder.

Normalisation to RGB: EXIF orientation is applied first; transparency (RGBA, LA, PA, palette with
a transparent colour) is composited on white; 16-bit and 32-bit greyscale ("I;16*", "I") is scaled
to 8 bits (values are taken as 16-bit, so 65535 is white), float greyscale ("F") is clipped to
0..255 (or scaled by 255 if it lies in 0..1); every other mode (L, 1, P, CMYK, YCbCr, ...) goes
through Pillow's own conversion.

Decompression bombs: the cap is `MAX_IMAGE_PIXELS` below, checked from the header before any
pixel is decoded. Pillow's process-wide `Image.MAX_IMAGE_PIXELS` is left alone (importing dsvl
changes no global state): its warning, which fires at half of our cap with Pillow's defaults, is
silenced, and its error (over twice its setting) is reported as "too_large" like ours. A process
that sets `PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True` makes Pillow accept truncated files; dsvl
never sets it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dsvl_cli.errors import DataError

ImageFailure = Literal["missing", "empty_file", "unreadable", "too_large", "truncated"]
IMAGE_FAILURES: tuple[str, ...] = get_args(ImageFailure)

# The one cap on decoded size: 2x Pillow's default warning threshold, i.e. the size at which
# Pillow itself refuses to open a file (about 13,377 x 13,377; ~537 MB as 8-bit RGB).
MAX_IMAGE_PIXELS = 178_956_970

_WHITE = (255, 255, 255, 255)
_TRUNCATION_HINTS = ("truncated", "broken", "incomplete", "end of file", "premature")


class ImageLoadError(DataError):
    """An image could not be loaded; `reason` is one of `IMAGE_FAILURES`, `path` the file."""

    def __init__(self, path: str | Path, reason: ImageFailure, detail: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"image {self.path}: {reason} ({detail})")


def _failure_of(err: Exception) -> ImageFailure:
    """Classify a decoding exception (Pillow reports truncation only in its message)."""
    if isinstance(err, Image.DecompressionBombError):
        return "too_large"
    if isinstance(err, EOFError):
        return "truncated"
    if isinstance(err, UnidentifiedImageError):
        return "unreadable"
    text = str(err).lower()
    return "truncated" if any(hint in text for hint in _TRUNCATION_HINTS) else "unreadable"


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ImageLoadError(path, "missing", "no such file")
    if not path.is_file():
        raise ImageLoadError(path, "missing", "not a regular file")
    if path.stat().st_size == 0:
        raise ImageLoadError(path, "empty_file", "0 bytes")


def _open_decoded(path: str | Path) -> Image.Image:
    """Open, check the pixel cap from the header, and fully decode; raise ImageLoadError."""
    path = Path(path)
    _check_file(path)
    try:
        with warnings.catch_warnings():
            # Our own cap (below) is the limit; Pillow's lower warning threshold is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                pixels = img.width * img.height
                if pixels > MAX_IMAGE_PIXELS:
                    raise ImageLoadError(
                        path,
                        "too_large",
                        f"{img.width}x{img.height} = {pixels} pixels > cap {MAX_IMAGE_PIXELS}",
                    )
                img.load()
                # exif_transpose always returns a new image, detached from the open file.
                return ImageOps.exif_transpose(img)
    except ImageLoadError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise ImageLoadError(path, _failure_of(err), f"{type(err).__name__}: {err}") from None


def _on_white(img: Image.Image) -> Image.Image:
    background = Image.new("RGBA", img.size, _WHITE)
    return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")


def _high_depth_grey(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer or float greyscale to 8 bits, then to RGB."""
    values = np.asarray(img, dtype=np.float64)
    if img.mode == "F" and values.size and np.nanmax(values) <= 1.0:
        values = values * 255.0
    elif img.mode != "F":
        values = np.clip(values, 0, 65535) / 257.0  # 16-bit range -> 0..255
    grey = np.clip(np.nan_to_num(values), 0, 255).round().astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB (see the module docstring for the rules)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        return _on_white(img)
    if mode.startswith("I") or mode == "F":
        return _high_depth_grey(img)
    return img.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Load an image file as an RGB PIL image, EXIF orientation applied.

    Raises:
        ImageLoadError: (a DataError) with `reason` "missing", "empty_file", "unreadable",
            "too_large" or "truncated", and a message naming the path.
    """
    img = _open_decoded(path)
    try:
        return to_rgb(img)
    except (OSError, ValueError) as err:
        raise ImageLoadError(path, "unreadable", f"mode {img.mode}: {err}") from None


def check_image(path: str | Path) -> ImageFailure | None:
    """Fully decode `path`; return None if it loads, else the failure reason (for reports)."""
    try:
        load_image(path)
    except ImageLoadError as err:
        return err.reason
    return None
