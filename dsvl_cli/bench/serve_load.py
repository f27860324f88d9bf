"""A bounded load test of `dsvl serve` on loopback: latency percentiles and requests/s.

    python -m dsvl_cli.bench.serve_load                       # tiny model, 16 clients x 5
    python -m dsvl_cli.bench.serve_load --clients 32 --requests 10 --queue-size 8 --max-tokens 8

`--clients` threads each send `--requests` requests (one image as a data URL and a question)
to a server on 127.0.0.1. A request is answered (200) or refused as busy (503, queue full);
anything else, or no answer within `--timeout` seconds, is a failure and makes the exit code 1.
Prints the counts, p50/p95 latency of the answered requests, and answered and total requests/s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from dsvl_cli.bench.serve_common import data_url, never_stop, run_load, tiny_export, user_message
from dsvl_cli.log import setup_logging


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dsvl_cli.bench.serve_load", description=__doc__)
    p.add_argument("model", nargs="?", type=Path, help="model folder (default: a tiny one)")
    p.add_argument("--image", type=Path, help="a PNG (default: one of the tiny task's)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=5, help="per client")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--queue-size", type=int, default=16)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("WARNING")
    from dsvl_cli.inference.loader import load_for_inference
    from dsvl_cli.serve.options import ServeOptions
    from dsvl_cli.serve.server import BackgroundServer, build_app

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or tiny_export(Path(tmp))
        image = args.image or Path(tmp) / "images" / "000000.png"
        loaded = load_for_inference(folder, device=args.device, dtype="fp32")
        if args.model is None:
            never_stop(loaded)
        options = ServeOptions(
            model_id="bench", max_tokens=args.max_tokens, queue_size=args.queue_size
        )
        body = {
            "model": "bench",
            "messages": [user_message("What colour is the shape?", [data_url(image)])],
            "max_tokens": args.max_tokens,
        }
        app, _ = build_app(loaded, options)
        with BackgroundServer(app) as srv:
            report = run_load(srv.url, body, args.clients, args.requests, args.timeout)
    print(
        f"{args.clients} clients x {args.requests} requests, max_tokens {args.max_tokens}, "
        f"queue {args.queue_size}: {report.summary()}"
    )
    for failure in report.failed[:10]:
        print(f"failed: {failure}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
