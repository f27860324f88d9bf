"""Shared by the `dsvl serve` benchmarks and tests: a tiny model, data URLs, a load test.

`tiny_export` writes the synthetic shapes task's tiny base models and a random-weight export
(what the tests use), so the benchmarks run offline in seconds. `run_load` drives a server with
concurrent clients over loopback and reports latencies; a client never waits longer than
`timeout_s` for one request, so a hung request shows as a failure, not as a hung benchmark.
"""

from __future__ import annotations

import base64
import json
import statistics
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsvl_cli.inference.loader import LoadedModel


def tiny_export(root: Path, max_seq_len: int = 1024, max_images: int = 8) -> Path:
    """Synthetic data + tiny models under `root`, a random-weight export in `root/export`."""
    from dsvl_cli.config import validate_config
    from dsvl_cli.demo.synthetic import generate_synthetic
    from dsvl_cli.model.builder import build_model
    from dsvl_cli.train.export import export_model

    generate_synthetic(root, num=12, seed=0)
    config = validate_config(
        {
            "model": {
                "language_model": str(root / "models/lm"),
                "vision": {"kind": "clip", "path": str(root / "models/vision")},
                "max_seq_len": max_seq_len,
                "max_images_per_sample": max_images,
            }
        }
    )
    torch.manual_seed(0)
    built = build_model(config)
    export_model(built.model, built, config, root / "export", {"step": 0})
    return root / "export"


def never_stop(loaded: LoadedModel) -> LoadedModel:
    """Make EOS unreachable, so every answer runs to max_tokens (equal work per request)."""
    head = loaded.model.get_output_embeddings()
    bias = torch.zeros(head.weight.shape[0])
    bias[loaded.built.tokenizer.eos_token_id] = -1e4
    head.bias = torch.nn.Parameter(bias)
    return loaded


def data_url(path: Path) -> str:
    """A PNG file as a ``data:image/png;base64,...`` URL."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def user_message(text: str, image_urls: list[str]) -> dict[str, Any]:
    """An OpenAI user message: the images, then the text."""
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": u}} for u in image_urls
    ]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def post_json(url: str, body: dict[str, Any], timeout_s: float = 600.0) -> dict[str, Any]:
    """POST `body` as JSON to `url` and return the JSON answer; HTTPError on a non-2xx status."""
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


@dataclass
class LoadReport:
    """Outcome of `run_load`: latencies (seconds) of the answered requests, counts, wall time."""

    latencies: list[float] = field(default_factory=list)
    busy: int = 0
    failed: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def percentile(self, q: float) -> float:
        """The q-th percentile (0-100) of the answered requests' latency, in seconds."""
        if not self.latencies:
            return float("nan")
        if len(self.latencies) == 1:
            return self.latencies[0]
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[int(q) - 1]

    def summary(self) -> str:
        done = len(self.latencies)
        return (
            f"{done} answered, {self.busy} busy (503), {len(self.failed)} failed in "
            f"{self.wall_s:.1f} s: p50 {self.percentile(50) * 1e3:.0f} ms, "
            f"p95 {self.percentile(95) * 1e3:.0f} ms, {done / self.wall_s:.2f} answered/s, "
            f"{(done + self.busy) / self.wall_s:.2f} requests/s"
        )


def run_load(
    url: str,
    body: dict[str, Any],
    clients: int = 16,
    requests: int = 5,
    timeout_s: float = 120.0,
    api_key: str | None = None,
) -> LoadReport:
    """`clients` threads each POST `body` to `url`/v1/chat/completions `requests` times."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode()
    report = LoadReport()

    def one() -> None:
        request = urllib.request.Request(f"{url}/v1/chat/completions", data, headers)
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                answer = json.loads(response.read())["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as err:
            if err.code == 503:
                report.busy += 1
            else:
                report.failed.append(f"{err.code}: {err.read()[:200]!r}")
            return
        except (urllib.error.URLError, OSError) as err:  # includes timeouts: a hung request
            report.failed.append(f"{type(err).__name__}: {err}")
            return
        if answer:
            report.latencies.append(time.perf_counter() - start)
        else:
            report.failed.append("empty answer")

    def client() -> None:
        for _ in range(requests):
            one()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    report.wall_s = time.perf_counter() - start
    return report
