"""Image references as written in data files -> local paths: the one resolver for every format.

Every source adapter (and the eval-set reader) turns the image strings it finds into paths here,
so all formats accept the same references:

* an absolute path: used as is (``~`` is expanded);
* a relative path: joined to the caller's root (an image root, a dataset's image folder, or the
  data file's folder), taken literally (``%20`` in a plain path is three characters);
* a ``file:`` URI, as ``Path.as_uri()`` writes it (``file:///data/my%20images/a.png``): the path
  is percent-decoded; the host must be empty or ``localhost``;
* anything else with a scheme (``http://``, ``https://``, ``s3://``, ``file://otherhost/``...)
  is refused with reason "remote_image": dsvl prepares data offline and never downloads.

``data:`` URIs hold the image itself; sources/files.py decodes them (it needs an output folder).

Finding the file (`locate_image`, what `dsvl eval` uses for eval sets and prepared JSONL): a
relative path is tried under the root as written, then by ever shorter tails, and the first
existing file wins. ``./eval/eval_data/images/cats/1.jpg`` under ``ROOT`` is looked for as
``ROOT/eval/eval_data/images/cats/1.jpg``, ``ROOT/eval_data/images/cats/1.jpg``,
``ROOT/images/cats/1.jpg``, ``ROOT/cats/1.jpg``, ``ROOT/1.jpg``. Data files write paths relative
to wherever their authors ran their scripts; the tails let the root be any folder on the way to
the images (the project folder, ``eval_data``, ``images``), so users point at the folder they
have instead of rebuilding the authors' tree. The longest tail is tried first, so a file is only
found by a shorter tail when the longer ones do not exist. Absolute paths and ``file:`` URIs
name one place. When no place holds the file, the error lists every place tried.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePath
from urllib.parse import urlsplit
from urllib.request import url2pathname

from dsvl_cli.data.images import ImageLoadError, load_image
from dsvl_cli.errors import DataError

# A URL scheme as RFC 3986 spells it, at least two letters so that a Windows drive ("C:") is not.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")
LOCAL_HOSTS = ("", "localhost")


class ImageRefError(DataError):
    """An image reference that names no local file; `reason` is the drop reason to count."""

    def __init__(self, ref: str, reason: str, detail: str) -> None:
        self.ref = ref
        self.reason = reason
        super().__init__(f"image {ref!r}: {detail}")


def is_data_uri(ref: str) -> bool:
    """True for a ``data:`` URI (the image bytes are inline)."""
    return ref[:5].lower() == "data:"


def resolve_image_ref(ref: str, root: str | Path) -> Path:
    """The absolute local path `ref` names (see the module docstring for the forms).

    Raises:
        ImageRefError: reason "remote_image" for a URL of another scheme or host, "bad_image_ref"
            for an empty reference or a ``data:`` URI (decode those before calling this).
    """
    if not ref.strip():
        raise ImageRefError(ref, "bad_image_ref", "empty image reference")
    match = _SCHEME.match(ref)
    if match is None:
        path = Path(ref).expanduser()
        return path if path.is_absolute() else (Path(root) / path).absolute()
    scheme = match.group(1).lower()
    if scheme == "data":
        raise ImageRefError(ref[:40], "bad_image_ref", "a data: URI must be decoded, not resolved")
    parts = urlsplit(ref)
    if scheme != "file" or parts.netloc.lower() not in LOCAL_HOSTS:
        raise ImageRefError(
            ref,
            "remote_image",
            "not a local file; dsvl prepares data offline and never downloads: download the "
            "image and reference its local path",
        )
    path = Path(url2pathname(parts.path))
    return path if path.is_absolute() else (Path(root) / path).absolute()


def candidate_paths(ref: str, root: str | Path) -> list[Path]:
    """Every place `ref` may name, in the order `locate_image` tries them.

    An absolute path or a ``file:`` URI names one place; a relative path names its join with
    `root`, then the join of each shorter tail (a tail never starts with ``..``).

    Raises:
        ImageRefError: as `resolve_image_ref` (remote URL, empty reference, ``data:`` URI).
    """
    literal = resolve_image_ref(ref, root)
    if _SCHEME.match(ref) is not None or Path(ref).expanduser().is_absolute():
        return [literal]
    parts = PurePath(ref).parts  # "." components are already gone ("./a/b" -> ("a", "b"))
    places = [literal]
    for start in range(1, len(parts)):
        if parts[start] != "..":
            tail = (Path(root) / PurePath(*parts[start:])).absolute()
            if tail not in places:
                places.append(tail)
    return places


def locate_image(ref: str, root: str | Path) -> Path:
    """The first of `candidate_paths(ref, root)` that is a file (see the module docstring).

    Raises:
        ImageRefError: reason "missing" when none is, naming every place tried; otherwise as
            `resolve_image_ref`.
    """
    places = candidate_paths(ref, root)
    for path in places:
        if path.is_file():
            return path
    tried = ", ".join(str(p) for p in places)
    raise ImageRefError(ref, "missing", f"no such file; tried {tried}")


def image_failure(err: ImageLoadError | ImageRefError) -> str:
    """The drop reason of an image that failed: "image_" + the loader's or resolver's reason."""
    return err.reason if "image" in err.reason else f"image_{err.reason}"


def find_image(ref: str, root: str | Path) -> tuple[Path | None, str | None, str | None]:
    """(file, failure reason, error): `locate_image`, then one full decode (`load_image`).

    Never raises on bad data: the reason is `image_failure`'s and the error the message; the
    file is None when no place holds it, and the reason and error are None when it loads.
    """
    try:
        path = locate_image(ref, root)
    except ImageRefError as err:
        return None, image_failure(err), str(err)
    try:
        load_image(path)
    except ImageLoadError as err:
        return path, image_failure(err), str(err)
    return path, None, None
