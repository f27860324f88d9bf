"""`dsvl serve --ui`: the page is served only when asked for, and works in headless Chromium
(Debian's `chromium`): two images, a question, the streamed answer, a second round."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from inference_helpers import make_export  # noqa: E402

from dsvl_cli.bench.serve_ui_check import check_ui  # noqa: E402
from dsvl_cli.inference.loader import load_for_inference  # noqa: E402
from dsvl_cli.serve.options import ServeOptions  # noqa: E402
from dsvl_cli.serve.server import BackgroundServer, build_app  # noqa: E402


def test_page_only_with_ui(tmp_path: Path) -> None:
    make_export(tmp_path)
    loaded = load_for_inference(tmp_path / "export", device="cpu", dtype="fp32")
    for ui in (True, False):
        options = ServeOptions(model_id='run/"final"<x>', api_key="k", ui=ui)
        app, _ = build_app(loaded, options)
        with BackgroundServer(app) as srv:
            r = httpx.get(f"{srv.url}/")  # the page needs no key; the API calls do
        if ui:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
            assert "<title>dsvl: run/&quot;final&quot;&lt;x&gt;</title>" in r.text
            assert 'const MODEL = "run/\\"final\\"\\u003cx>", NEEDS_KEY = true;' in r.text
        else:
            assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (apt-get install)")
def test_page_in_headless_chromium(tmp_path: Path) -> None:
    answers, expected = check_ui(tmp_path)
    assert answers == expected and all(answers)
    assert (tmp_path / "serve_ui.png").read_bytes().startswith(b"\x89PNG")
