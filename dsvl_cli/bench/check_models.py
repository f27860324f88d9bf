"""Random-weight base models for the GPU check's training runs, saved like users' model folders.

    python -m dsvl_cli.bench.check_models --data DATA --out MODELS --size 1b --json facts.json

`--size 1b`: a LLaMA-shaped LM of about 1.0B parameters (hidden 2048, 20 layers, 16 heads,
intermediate 5504, the vocabulary of the synthetic task's tokenizer) and a CLIP ViT-L/14-shaped
vision tower (hidden 1024, 24 layers, 16 heads, patch 14, 224 x 224 images, about 0.30B).
`--size tiny`: the demo's tiny shapes (`dsvl_cli.demo.tiny_models` defaults), for the CPU smoke run.

The builders are `dsvl_cli.demo.tiny_models`'s (same configs, tokenizer and CLIP image
processor); here they create their tensors on `--device` in `--dtype` (default: the GPU in bf16
when there is one), because initialising and saving 1.3B fp32 parameters on the CPU costs a
minute of a short GPU loan, and bf16 files are half the size to write and to read back.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dsvl_cli.inference.loader import resolve_device, resolve_dtype
from dsvl_cli.log import get_logger, setup_logging

log = get_logger(__name__)

DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class CheckShapes:
    """Shapes of the LM (hidden, layers, heads, kv heads, MLP width, positions) and vision tower."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    max_positions: int
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int


SIZES: dict[str, CheckShapes] = {
    "1b": CheckShapes(2048, 20, 16, 16, 5504, 2048, 224, 14, 1024, 24, 16, 4096),
    "tiny": CheckShapes(64, 2, 4, 2, 128, 1024, 32, 8, 64, 2, 4, 128),
}


@contextmanager
def creating_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """New tensors (module parameters included) go to `device` in `dtype` while active."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def count_parameters(folder: Path, kind: str) -> int:
    """Parameters of the saved model in `folder` ("lm" or "vision"), counted on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

    with torch.device("meta"):
        if kind == "lm":
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
        else:
            model = CLIPVisionModel(CLIPVisionConfig.from_pretrained(folder))
    return sum(p.numel() for p in model.parameters())


def build_check_models(
    data_dir: Path, out_dir: Path, shapes: CheckShapes, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    """Save `out_dir/lm` (LLaMA + the data's tokenizer) and `out_dir/vision` (CLIP + processor).

    Args:
        data_dir: a `dsvl prepare-data synthetic` output (its tokenizer is in models/lm).
        out_dir: where the two model folders go.
        shapes: the model shapes.
        device, dtype: where and in which dtype the weights are created (and saved).

    Returns:
        Facts for the report: parameter counts, dtype, device, seconds.
    """
    from transformers import AutoTokenizer

    from dsvl_cli.demo.tiny_models import build_tiny_clip, build_tiny_lm

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(data_dir / "models" / "lm")
    s = shapes
    with creating_on(device, dtype):
        build_tiny_lm(
            out_dir / "lm",
            tokenizer,
            hidden_size=s.hidden,
            layers=s.layers,
            heads=s.heads,
            kv_heads=s.kv_heads,
            intermediate=s.intermediate,
            max_position_embeddings=s.max_positions,
        )
        build_tiny_clip(
            out_dir / "vision",
            image_size=s.image_size,
            patch_size=s.patch_size,
            hidden_size=s.vision_hidden,
            layers=s.vision_layers,
            heads=s.vision_heads,
            intermediate=s.vision_intermediate,
        )
    return {
        "lm_params": count_parameters(out_dir / "lm", "lm"),
        "vision_params": count_parameters(out_dir / "vision", "vision"),
        "vocab_size": len(tokenizer),
        "dtype": str(dtype).removeprefix("torch."),
        "device": device.type,
        "shapes": asdict(shapes),
        "seconds": round(time.perf_counter() - start, 1),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dsvl_cli.bench.check_models", description=__doc__)
    p.add_argument("--data", type=Path, required=True, help="synthetic data folder")
    p.add_argument("--out", type=Path, required=True, help="folder for lm/ and vision/")
    p.add_argument("--size", choices=sorted(SIZES), default="1b")
    p.add_argument("--device", default="auto", help="auto (cuda if visible), cpu, cuda")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bf16 on cuda")
    p.add_argument("--json", type=Path, default=None, help="write the facts here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Build and save the models; log (and optionally write) the facts."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    facts = build_check_models(args.data, args.out, SIZES[args.size], device, dtype)
    log.info("built %s models in %s: %s", args.size, args.out, facts)
    if args.json is not None:
        args.json.write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")
    return facts


if __name__ == "__main__":
    setup_logging()
    main()
