"""Peak memory and speed of preparing a multi-GB MIMIC-IT image file (streamed with ijson).

    python -m dsvl_cli.bench.stream_json --gb 4            # a 4 GB VST.json in a temp folder
    python -m dsvl_cli.bench.stream_json --gb 0.2 --keep   # small; keep the files to look at
    python -m dsvl_cli.bench.stream_json --json out.json   # also write the numbers as JSON

Writes a VST.json-like file (one JSON object: image id -> base64 JPEG) of the given size,
streaming to disk (the generator holds one image), plus VST_instructions.json with one
instruction per image, then runs `prepare_data(["otter_mimicit_vst"])` in a fresh child process,
the real source path: two ijson passes, base64 decode, one JPEG file written per image. The
image check is off here (its speed is `dsvl_cli.bench.image_check_speed`'s subject), so the
numbers are the streaming source's. Reports the child's peak RSS (`ru_maxrss`) and images/s.
Needs free disk of about 1.8x `--gb` (the JSON plus the decoded images).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dsvl_cli.log import get_logger, setup_logging

log = get_logger(__name__)
SUBSET = "VST"
SOURCE = "otter_mimicit_vst"
MB = 1024 * 1024


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dsvl_cli.bench.stream_json", description=__doc__)
    p.add_argument("--gb", type=float, default=4.0, help="size of the image JSON (GiB)")
    p.add_argument("--image-kb", type=int, default=150, help="size of each JPEG (KiB, about)")
    p.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp one)")
    p.add_argument("--keep", action="store_true", help="keep the generated and prepared files")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def noise_jpeg(target_kb: int, seed: int = 0) -> bytes:
    """A JPEG of random pixels, about `target_kb` KiB (noise barely compresses)."""
    side = max(16, int((target_kb * 1024 / 1.6) ** 0.5))
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def generate(root: Path, gb: float, image_kb: int) -> int:
    """Write MIMIC-IT/VST.json (about `gb` GiB) and its instructions; the number of images."""
    folder = root / "MIMIC-IT"
    folder.mkdir(parents=True, exist_ok=True)
    blob = json.dumps(base64.b64encode(noise_jpeg(image_kb)).decode())
    target, written, count = int(gb * 1024 * MB), 0, 0
    with open(folder / f"{SUBSET}.json", "w", encoding="utf-8") as fh:
        fh.write("{")
        while written < target:
            entry = f'{"," if count else ""}"{SUBSET}_IMG_{count}": {blob}'
            fh.write(entry)
            written += len(entry)
            count += 1
        fh.write("}")
    data = {
        f"{SUBSET}_INS_{i}": {
            "instruction": f"What happens in frame {i}?",
            "answer": "Something red.",
            "image_ids": [f"{SUBSET}_IMG_{i}"],
            "rel_ins_ids": [],
        }
        for i in range(count)
    }
    text = json.dumps({"meta": {}, "data": data})
    (folder / f"{SUBSET}_instructions.json").write_text(text, encoding="utf-8")
    return count


def run_child(root: Path) -> dict[str, Any]:
    """In this (fresh) process: prepare the source, return seconds, images and peak RSS."""
    from dsvl_cli.data.prepare import PrepareOptions, prepare_data

    start = time.perf_counter()
    opts = PrepareOptions(data_path=root, out=root / "prepared", check_images=False)
    [result] = prepare_data([SOURCE], opts)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"kept": result.kept, "seconds": seconds, "peak_rss_mib": peak_kib / 1024}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(run_child(args.child)))
        return {}
    setup_logging()
    root = args.dir or Path(tempfile.mkdtemp(prefix="dsvl-stream-json-"))
    try:
        start = time.perf_counter()
        images = generate(root, args.gb, args.image_kb)
        size = (root / "MIMIC-IT" / f"{SUBSET}.json").stat().st_size
        log.info("wrote %.2f GiB, %d images in %.0f s", size / 1024 / MB, images,
                 time.perf_counter() - start)  # fmt: skip
        cmd = [sys.executable, "-m", "dsvl_cli.bench.stream_json", "--child", str(root)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        child = json.loads(out.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    result = {
        "file_gib": round(size / 1024 / MB, 3),
        "images": images,
        "kept": child["kept"],
        "seconds": round(child["seconds"], 1),
        "images_per_s": round(images / child["seconds"], 1),
        "mib_per_s": round(size / MB / child["seconds"], 1),
        "peak_rss_mib": round(child["peak_rss_mib"], 1),
    }
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
