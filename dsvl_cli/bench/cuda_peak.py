"""Run a `dsvl` command in this process and record its peak CUDA memory in a JSON file.

    python -m dsvl_cli.bench.cuda_peak PEAK.json train RECIPE key=value ...

is `python -m dsvl_cli train RECIPE key=value ...` (the same `dsvl_cli.cli.main`, same arguments)
plus, when it exits (success, error or exception), PEAK.json with torch's allocator peaks for the
current device: {"cuda": true, "max_allocated_gib": ..., "max_reserved_gib": ...}, or
{"cuda": false} when the command never initialised CUDA. The trainer logs no memory figure, and
this measures one without touching it. "allocated" is what tensors held at the peak; "reserved"
adds the caching allocator's spare blocks; neither counts the CUDA context (about 0.5 GiB).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

USAGE = "usage: python -m dsvl_cli.bench.cuda_peak PEAK.json DSVL_ARGS..."


def cuda_peak() -> dict[str, float | bool]:
    """Allocator peaks of the current CUDA device in GiB, or {"cuda": False}."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {"cuda": False}
    return {
        "cuda": True,
        "max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
    }


def main(argv: list[str]) -> None:
    """Run `dsvl ARGS...` with `argv[0]` as the peak file; exits with dsvl's exit status."""
    if len(argv) < 2:
        sys.exit(USAGE)
    peak_file = Path(argv[0])
    sys.argv = ["dsvl", *argv[1:]]
    from dsvl_cli.cli import main as dsvl_main

    try:
        dsvl_main()
    finally:
        peak_file.write_text(json.dumps(cuda_peak()) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1:])
