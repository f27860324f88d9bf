"""Drive `dsvl serve --ui`'s page in headless Chromium: two rounds, three images, a screenshot.

    python -m dsvl_cli.bench.serve_ui_check --out DIR          # tiny model; needs `chromium`

Starts the page's server on loopback with a tiny random model, opens ``/`` in headless Chromium
(Debian's `chromium` package) over the DevTools protocol on a pipe (no extra packages), picks
two images in the file input as a user would, asks, waits for the streamed answer, then a
second round with a third image. Prints both answers and writes `DIR/serve_ui.png`. The answers
must equal what `dsvl chat`'s session gives for the same conversation (exit code 1 otherwise).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dsvl_cli.log import setup_logging


class Browser:
    """Headless Chromium spoken to over ``--remote-debugging-pipe`` (JSON messages, NUL-ended)."""

    def __init__(self, binary: str, profile: Path) -> None:
        cmd_read, self._cmd = os.pipe()
        self._res, res_write = os.pipe()

        def child_fds() -> None:  # the pipe's ends become fds 3 and 4, kept across exec
            ends = [os.dup(cmd_read), os.dup(res_write)]  # copies: dup2 below may clobber
            for fd, end in zip((3, 4), ends, strict=True):
                if end != fd:
                    os.dup2(end, fd)
                os.set_inheritable(fd, True)

        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--remote-debugging-pipe", f"--user-data-dir={profile}",
                "--window-size=1000,900", "about:blank"]  # fmt: skip
        # Its own process group: Chromium's helpers outlive a terminated parent and keep writing
        # into the profile, so `close` ends the whole group.
        self.proc = subprocess.Popen(
            args,
            preexec_fn=child_fds,
            close_fds=False,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.close(cmd_read)
        os.close(res_write)
        self._next = 0
        self._buffer = b""
        self.session: str | None = None

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command (to the attached page, once there is one); its result."""
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        os.write(self._cmd, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _read(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            chunk = os.read(self._res, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self.call("Page.navigate", url=url)
        self.wait("document.readyState === 'complete' && !!document.getElementById('send')")

    def eval(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 120.0) -> Any:
        deadline = time.monotonic() + timeout
        while not (value := self.eval(expression)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"page never satisfied: {expression}")
            time.sleep(0.1)
        return value

    def pick_files(self, selector: str, paths: Sequence[Path]) -> None:
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.call("DOM.setFileInputFiles", nodeId=node, files=[str(p) for p in paths])

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        """End Chromium and every helper process it started (bounded: at most about 65 s)."""
        self.session = None  # Browser.close is a browser-level command
        with contextlib.suppress(OSError, RuntimeError):
            self.call("Browser.close")  # a clean exit; the pipe may close before the reply
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                break  # no helper left in the group
            time.sleep(0.1)
        for fd in (self._cmd, self._res):
            with contextlib.suppress(OSError):
                os.close(fd)


def ask_in_page(browser: Browser, question: str, images: Sequence[Path]) -> str:
    """Pick `images`, type `question`, send; the streamed answer once the page says done."""
    rounds = browser.eval("document.querySelectorAll('#log .turn').length")
    browser.pick_files("#files", images)
    browser.wait(f"document.querySelectorAll('#pending img').length === {len(images)}")
    browser.eval(f"document.getElementById('question').value = {json.dumps(question)}")
    browser.eval("document.getElementById('send').click()")
    status = browser.wait(
        f"document.querySelectorAll('#log .turn').length === {rounds + 1} && "
        "['done', 'not answered; the conversation is unchanged'].includes("
        "document.getElementById('status').textContent) && "
        "document.getElementById('status').textContent"
    )
    answer = browser.eval("[...document.querySelectorAll('.assistant')].pop().textContent")
    if status != "done":
        raise RuntimeError(f"the page shows an error: {answer}")
    return answer


TINY_TURNS = [("Which image has the red shape?", [0, 1]), ("And what is in this one?", [2])]
# With a trained demo export and the README's images 000000-000002 (`--model`, `--images`).
DEMO_TURNS = [
    ("Which image has a blue square, the first or the second?", [0, 1]),
    ("What colour is the circle?", [2]),
]


def check_ui(
    out: Path,
    chromium: str = "chromium",
    model: Path | None = None,
    images: list[Path] | None = None,
) -> tuple[list[str], list[str]]:
    """(answers in the page, answers of `dsvl chat`'s session); writes `out`/serve_ui.png.

    Without `model`, a random tiny export and its images; with it, `images` (three paths).
    """
    from dsvl_cli.bench.serve_common import tiny_export
    from dsvl_cli.data.encoder import SampleEncoder
    from dsvl_cli.inference.generation import GenerationSettings
    from dsvl_cli.inference.loader import load_for_inference
    from dsvl_cli.inference.session import ChatSession
    from dsvl_cli.serve.options import ServeOptions
    from dsvl_cli.serve.server import BackgroundServer, build_app

    turns = TINY_TURNS if model is None else DEMO_TURNS
    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            folder = tiny_export(Path(tmp))
            images = sorted((Path(tmp) / "images").glob("*.png"))
        else:
            folder, images = model, list(images or [])
        loaded = load_for_inference(folder, device="cpu", dtype="fp32")
        settings = GenerationSettings(max_new_tokens=12)
        session = ChatSession(
            loaded.built,
            settings,
            max_context=loaded.max_context,
            encoder=SampleEncoder.from_built(loaded.built, loaded.config),
        )
        expected = [session.ask(q, [images[k] for k in ks]).text for q, ks in turns]
        app, _ = build_app(loaded, ServeOptions("tiny", max_tokens=12, ui=True))
        browser = Browser(chromium, Path(tmp) / "profile")
        try:
            with BackgroundServer(app) as srv:
                browser.open(f"{srv.url}/")
                answers = [ask_in_page(browser, q, [images[k] for k in ks]) for q, ks in turns]
                out.mkdir(parents=True, exist_ok=True)
                browser.screenshot(out / "serve_ui.png")
        finally:
            browser.close()
    return answers, expected


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsvl_cli.bench.serve_ui_check", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("serve-ui-check"))
    p.add_argument("--chromium", default="chromium")
    p.add_argument("--model", type=Path, help="a trained demo export (default: random tiny)")
    p.add_argument("--images", type=Path, nargs=3, help="with --model: three images")
    args = p.parse_args(argv)
    setup_logging("WARNING")
    if shutil.which(args.chromium) is None:
        print(f"{args.chromium} not found (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    if (args.model is None) != (args.images is None):
        p.error("--model and --images go together")
    answers, expected = check_ui(args.out, args.chromium, args.model, args.images)
    print(f"page answers: {answers}\nchat answers: {expected}")
    print(f"screenshot: {args.out / 'serve_ui.png'}")
    return 0 if answers == expected else 1


if __name__ == "__main__":
    sys.exit(main())
