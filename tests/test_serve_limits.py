"""`dsvl serve` under pressure: a full queue (503), clients that leave, a bounded load test,
stop strings, and the command line. The model never emits EOS here, so every answer runs to
its max_tokens and a long request really occupies the worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from inference_helpers import make_export  # noqa: E402

from dsvl_cli.bench.serve_common import data_url, never_stop, run_load, user_message  # noqa: E402
from dsvl_cli.inference.loader import LoadedModel, load_for_inference  # noqa: E402
from dsvl_cli.serve.options import ServeOptions  # noqa: E402
from dsvl_cli.serve.server import BackgroundServer, build_app  # noqa: E402
from dsvl_cli.serve.stream import Deltas  # noqa: E402

LONG = 300  # tokens: a request that holds the worker for seconds on 2 cores


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_export(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def loaded(shapes: Path) -> LoadedModel:
    return never_stop(load_for_inference(shapes / "export", device="cpu", dtype="fp32"))


@pytest.fixture
def server(loaded: LoadedModel) -> Iterator[BackgroundServer]:
    options = ServeOptions(model_id="tiny", max_tokens=LONG, queue_size=1)
    app, _ = build_app(loaded, options)
    with BackgroundServer(app) as srv:
        yield srv


def body(max_tokens: int, stream: bool = False, text: str = "Hi", **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": text}]
    return {
        "model": "tiny",
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": stream,
        **extra,
    }


def health(http: httpx.Client) -> dict[str, Any]:
    return http.get("/health").json()


def wait_for(http: httpx.Client, check: Any, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not check(state := health(http)):
        assert time.monotonic() < deadline, f"server state never reached: {state}"
        time.sleep(0.05)
    return state


def test_queue_full_503_and_clients_that_leave_free_the_worker(
    server: BackgroundServer, loaded: LoadedModel
) -> None:
    # Every model call takes >= 20 ms here, so a LONG answer holds the worker for seconds
    # whatever the machine's speed; the clients below leave long before.
    slow = loaded.model.register_forward_pre_hook(lambda *_: time.sleep(0.02))
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            _full_queue_then_leave(server, http)
            # A non-streaming client that leaves while it waits in the queue is skipped.
            with http.stream("POST", "/v1/chat/completions", json=body(LONG, stream=True)) as d:
                lines = d.iter_lines()  # kept: a dropped iterator closes the connection
                assert next(lines).startswith("data: ")
                with pytest.raises(httpx.ReadTimeout):
                    http.post("/v1/chat/completions", json=body(4), timeout=0.5)
                time.sleep(1.0)  # the handler notices it (it checks every POLL_S)
            wait_for(http, lambda s: s["cancelled"] == 2 and s["skipped"] == 1)
            # A non-streaming client that leaves while its answer is generated stops it.
            with pytest.raises(httpx.ReadTimeout):
                http.post("/v1/chat/completions", json=body(LONG), timeout=0.5)
            state = wait_for(http, lambda s: s["cancelled"] == 3 and not s["busy"])
            assert state["answered"] == 1 and state["waiting"] == 0
    finally:
        slow.remove()
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body(3), timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def _full_queue_then_leave(server: BackgroundServer, http: httpx.Client) -> None:
    """A long stream runs, one request waits, the next gets 503; the stream's client leaves."""
    results: dict[str, Any] = {}
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)

    def waiting_request() -> None:
        reply = client.chat.completions.create(**body(4))
        results["waiting"] = reply.choices[0].message.content

    with http.stream("POST", "/v1/chat/completions", json=body(LONG, stream=True)) as long:
        lines = long.iter_lines()  # kept: a dropped iterator closes the connection
        assert next(lines).startswith("data: ")  # the role chunk: it runs
        thread = threading.Thread(target=waiting_request)
        thread.start()
        wait_for(http, lambda s: s["busy"] and s["waiting"] == 1)
        with pytest.raises(openai.APIStatusError) as full:
            client.chat.completions.create(**body(4))
        assert full.value.status_code == 503 and full.value.body["code"] == "queue_full"
    # The stream was closed after its first chunk: its generation stops, the waiting request
    # is answered.
    thread.join(120)
    assert not thread.is_alive() and results["waiting"]
    wait_for(http, lambda s: s["cancelled"] == 1 and s["answered"] == 1 and not s["busy"])


def test_load_every_request_answered_or_busy(loaded: LoadedModel, shapes: Path) -> None:
    options = ServeOptions(model_id="tiny", max_tokens=4, queue_size=4)
    app, _ = build_app(loaded, options)
    image = data_url(shapes / "images" / "000000.png")
    request = {"model": "tiny", "messages": [user_message("Colour?", [image])], "max_tokens": 2}
    with BackgroundServer(app) as srv:
        report = run_load(srv.url, request, clients=16, requests=5, timeout_s=120)
        state = httpx.get(f"{srv.url}/health").json()
    print(f"\nload test, 16 clients x 5 requests: {report.summary()}")
    assert report.failed == []
    assert len(report.latencies) + report.busy == 80 and report.latencies
    assert state["answered"] == len(report.latencies) and state["waiting"] == 0


def test_stop_strings_streamed_and_not(server: BackgroundServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
    full = client.chat.completions.create(**body(24)).choices[0].message.content or ""
    # Two ASCII letters from the middle of the answer (random weights also emit partial UTF-8).
    pairs = [full[i : i + 2] for i in range(2, len(full) - 1)]
    stop = next(p for p in pairs if p.isascii() and p.isalpha())
    cut = full[: full.index(stop)].strip()
    reply = client.chat.completions.create(**body(24, stop=[stop, "never-seen"]))
    assert reply.choices[0].message.content == cut
    assert reply.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(**body(24, stream=True, stop=stop)))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_cli_serves_and_refuses_bad_options(shapes: Path, tmp_path: Path) -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "dsvl_cli", "serve", str(shapes / "export"), "--queue-size", "0",
         "--image-root", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "--queue-size must be >= 1" in bad.stderr and "is not a folder" in bad.stderr
    cmd = [sys.executable, "-m", "dsvl_cli", "serve", str(shapes / "export"), "--port", "0",
           "--device", "cpu", "--model-name", "shapes", "--api-key", "k"]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        url = _listening_url(proc)
        auth = {"Authorization": "Bearer k"}
        assert httpx.get(f"{url}/v1/models", headers=auth).json()["data"][0]["id"] == "shapes"
        r = httpx.post(f"{url}/v1/chat/completions", json=body(2, model="shapes"), headers=auth)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= 2
    finally:
        proc.terminate()
        proc.wait(30)


def _listening_url(proc: subprocess.Popen[str]) -> str:
    """The address uvicorn reports on stderr ("Uvicorn running on http://...")."""
    assert proc.stderr is not None
    for line in proc.stderr:
        if "Uvicorn running on" in line:
            return line.split("Uvicorn running on ")[1].split()[0]
    raise AssertionError(f"the server exited ({proc.wait()}) without listening")


def test_health_json_is_plain(server: BackgroundServer) -> None:
    state = httpx.get(f"{server.url}/health").json()
    assert json.loads(json.dumps(state)) == state and state["queue_size"] == 1


def test_stream_deltas_only_send_what_the_answer_starts_with() -> None:
    deltas = Deltas(("##",))
    assert [deltas.add(p) for p in [" red ", "blue #", "# tail"]] == ["red", " blue", ""]
    assert deltas.finish("red blue") == ""
    deltas = Deltas()
    assert [deltas.add("a "), deltas.add("b"), deltas.finish("a b c")] == ["a", " b", " c"]
