"""Images per second of prepare-data's image check, by worker count.

    python -m dsvl_cli.bench.image_check_speed                       # 3000 images, 1 and 2 workers
    python -m dsvl_cli.bench.image_check_speed --images 5000 --workers 1 2 4
    python -m dsvl_cli.bench.image_check_speed --json out.json

Writes `--images` synthetic JPEGs (random pixels, `--size` px square, a few distinct files
repeated under different names, so generation is quick and each check still decodes a file),
then times `data.image_check.check_paths` over them once per worker count (the pool's start-up
included, as prepare-data pays it). Checks that every worker count gives the same results.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dsvl_cli.data.image_check import check_paths
from dsvl_cli.log import get_logger, setup_logging

log = get_logger(__name__)
DISTINCT = 16  # different JPEGs written; the rest are copies under other names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dsvl_cli.bench.image_check_speed", description=__doc__
    )
    p.add_argument("--images", type=int, default=3000, help="number of image files")
    p.add_argument("--size", type=int, default=384, help="side of each image in pixels")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts")
    p.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp one)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return p.parse_args(argv)


def make_images(folder: Path, count: int, size: int) -> list[Path]:
    """`count` JPEG files of random pixels (DISTINCT different contents, round robin)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(DISTINCT):
        buf = io.BytesIO()
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    paths = []
    for i in range(count):
        path = folder / f"{i:06d}.jpg"
        path.write_bytes(blobs[i % DISTINCT])
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    setup_logging()
    root = args.dir or Path(tempfile.mkdtemp(prefix="dsvl-image-check-"))
    try:
        paths = make_images(root / "images", args.images, args.size)
        rows, first = [], None
        for workers in args.workers:
            start = time.perf_counter()
            results = check_paths(paths, workers)
            seconds = time.perf_counter() - start
            if first is None:
                first = results
            if results != first:
                raise SystemExit(f"results with {workers} workers differ from the first run")
            rows.append({"workers": workers, "images": len(paths), "seconds": round(seconds, 2),
                         "images_per_s": round(len(paths) / seconds, 1)})  # fmt: skip
            log.info("%d worker(s): %.1f images/s", workers, len(paths) / seconds)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(rows, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
