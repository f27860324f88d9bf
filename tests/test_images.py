"""Image loading: every Pillow mode becomes RGB with the right pixels; failures get a reason."""

from __future__ import annotations

import io
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dsvl_cli.data import images
from dsvl_cli.data.images import ImageLoadError, check_image, load_image, to_rgb
from dsvl_cli.errors import DataError


def _save(img: Image.Image, path: Path, **kwargs: object) -> Path:
    img.save(path, **kwargs)
    return path


def _pixel(path: Path, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    img = load_image(path)
    assert img.mode == "RGB"
    return img.getpixel(xy)


def test_rgb_png_round_trips(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (5, 4), (10, 20, 30)), tmp_path / "a.png")
    img = load_image(path)
    assert (img.mode, img.size, img.getpixel((4, 3))) == ("RGB", (5, 4), (10, 20, 30))
    assert check_image(path) is None


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    assert _pixel(_save(pal, tmp_path / "p.png")) == (200, 10, 10)
    # Palette index 1 marked transparent: composited on white.
    assert _pixel(_save(pal, tmp_path / "pt.png", transparency=1)) == (255, 255, 255)


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(0, 0, 255, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    path = _save(rgba, tmp_path / "rgba.png")
    img = load_image(path)
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((1, 0)) == (0, 0, 255)
    assert img.getpixel((2, 0)) == (127, 127, 127)
    la = Image.new("LA", (1, 1), (0, 0))
    assert _pixel(_save(la, tmp_path / "la.png")) == (255, 255, 255)


def test_sixteen_bit_grey_is_scaled(tmp_path: Path) -> None:
    values = np.array([[0, 128 * 257, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "g16.png")
    img = load_image(path)
    assert [img.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128,) * 3, (255,) * 3]


def test_thirty_two_bit_and_float_grey() -> None:
    as_int = Image.fromarray(np.array([[0, 65535, 70000]], dtype=np.int32))
    assert [to_rgb(as_int).getpixel((x, 0)) for x in range(3)] == [(0,) * 3, (255,) * 3, (255,) * 3]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert [to_rgb(unit).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = _save(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), tmp_path / "c.jpg")
    assert Image.open(path).mode == "CMYK"
    r, g, b = _pixel(path)
    assert min(r, g, b) >= 250  # no ink = white


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(img, tmp_path / "rot.jpg", exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    # Rotated clockwise: the left band is now at the top.
    top, bottom = loaded.getpixel((10, 2)), loaded.getpixel((10, 37))
    assert top[2] > 200 and top[0] < 60
    assert bottom[0] > 200 and bottom[2] < 60


def _jpeg_bytes() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.jpg", b"", "empty_file"),
        ("garbage.jpg", b"this is not an image at all", "unreadable"),
        ("cut.jpg", None, "truncated"),
    ],
)
def test_bad_files_have_reasons(tmp_path: Path, name: str, content: bytes | None, reason: str):
    data = _jpeg_bytes()
    path = tmp_path / name
    path.write_bytes(data[: len(data) // 2] if content is None else content)
    assert check_image(path) == reason
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert info.value.reason == reason
    assert str(path) in str(info.value) and reason in str(info.value)
    assert isinstance(info.value, DataError)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert check_image(tmp_path / "nope.png") == "missing"
    assert check_image(tmp_path) == "missing"
    with pytest.raises(DataError, match="nope.png: missing"):
        load_image(tmp_path / "nope.png")


def test_pixel_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(Image.new("RGB", (20, 20)), tmp_path / "big.png")
    assert check_image(path) is None
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 399)
    assert check_image(path) == "too_large"
    with pytest.raises(ImageLoadError, match="400 pixels > cap 399"):
        load_image(path)


def test_pillow_bomb_error_is_too_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(Image.new("RGB", (20, 20)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses over 2x = 200
    assert check_image(path) == "too_large"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # Pillow only warns: we accept
    assert check_image(path) is None
