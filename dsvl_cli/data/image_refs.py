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
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

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
