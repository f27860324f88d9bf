"""Round-k latency of `dsvl serve` with prefix reuse and without, for k = 1..K.

    python -m dsvl_cli.bench.serve_rounds                    # tiny random model, 6 rounds
    python -m dsvl_cli.bench.serve_rounds MODEL --rounds 6 --max-tokens 16 --repeat 3

A client holds one conversation the OpenAI way: every request resends the whole history (each
round adds one new image and the previous answer). The same conversation runs against a server
with the session cache (`--cache-sessions 8`: the unchanged prefix's KV and image features are
reused) and one without (`0`: every request encodes everything). Answers never end early (EOS
is made unreachable on the tiny model), so both do the same generation work, and both must give
the same answers. The two servers run side by side and take turns, one conversation each, so other
load on the machine slows both alike. Prints, per round: prompt tokens, tokens read from the
cache, and the median latency over `--repeat` conversations for each server.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dsvl_cli.bench.serve_common import (
    data_url,
    never_stop,
    post_json,
    tiny_export,
    user_message,
)
from dsvl_cli.log import setup_logging


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dsvl_cli.bench.serve_rounds", description=__doc__)
    p.add_argument("model", nargs="?", type=Path, help="model folder (default: a tiny one)")
    p.add_argument("--images", type=Path, help="folder of PNGs (default: the tiny task's)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--repeat", type=int, default=5, help="conversations per server")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def conversation(url: str, images: list[str], rounds: int, max_tokens: int) -> list[dict[str, Any]]:
    """One conversation of `rounds` rounds; per round: latency (s), usage, answer."""
    messages: list[dict[str, Any]] = []
    results = []
    for k in range(rounds):
        messages.append(user_message(f"What about image {k + 1}?", [images[k % len(images)]]))
        body = {"model": "bench", "messages": messages, "max_tokens": max_tokens}
        start = time.perf_counter()
        reply = post_json(f"{url}/v1/chat/completions", body)
        latency = time.perf_counter() - start
        answer = reply["choices"][0]["message"]["content"]
        messages.append({"role": "assistant", "content": answer})
        results.append({"latency": latency, "usage": reply["usage"], "answer": answer})
    return results


def measure(loaded: Any, images: list[str], args: argparse.Namespace) -> tuple[list[Any], ...]:
    """`args.repeat` conversations on each of two servers (session cache 8 and 0), alternated
    so that anything else running on the machine slows both alike."""
    from dsvl_cli.serve.options import ServeOptions
    from dsvl_cli.serve.server import BackgroundServer, build_app

    apps = [
        build_app(loaded, ServeOptions("bench", cache_sessions=cache, max_tokens=args.max_tokens))
        for cache in (8, 0)
    ]
    runs: tuple[list[Any], list[Any]] = ([], [])
    with BackgroundServer(apps[0][0]) as reuse, BackgroundServer(apps[1][0]) as fresh:
        for srv in (reuse, fresh):
            conversation(srv.url, images, 1, args.max_tokens)  # warm-up
        for _ in range(args.repeat):
            for srv, out in zip((reuse, fresh), runs, strict=True):
                out.append(conversation(srv.url, images, args.rounds, args.max_tokens))
    return runs


def table(reused: list[Any], fresh: list[Any]) -> str:
    lines = [
        "| round | prompt tokens | from cache | latency, reuse (ms) | latency, no reuse (ms) |",
        "|---|---|---|---|---|",
    ]
    for k in range(len(reused[0])):
        with_ms = statistics.median(run[k]["latency"] for run in reused) * 1e3
        without_ms = statistics.median(run[k]["latency"] for run in fresh) * 1e3
        usage = reused[0][k]["usage"]
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        lines.append(
            f"| {k + 1} | {usage['prompt_tokens']} | {cached} | {with_ms:.0f} | {without_ms:.0f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging("WARNING")
    from dsvl_cli.inference.loader import load_for_inference

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or tiny_export(Path(tmp))
        image_dir = args.images or (Path(tmp) / "images")
        images = [data_url(p) for p in sorted(image_dir.glob("*.png"))[: args.rounds]]
        loaded = load_for_inference(folder, device=args.device, dtype="fp32")
        if args.model is None:
            never_stop(loaded)
        reused, fresh = measure(loaded, images, args)
    same = [[r["answer"] for r in run] for run in reused] == [
        [r["answer"] for r in run] for run in fresh
    ]
    print(table(reused, fresh))
    print(f"answers identical with and without reuse: {same}")


if __name__ == "__main__":
    main()
