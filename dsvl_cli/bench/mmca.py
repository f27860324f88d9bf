"""Throughput of MMCA against plain causal SDPA on a LLaMA-2-7B-shaped decoder.

    python -m dsvl_cli.bench.mmca                      # 7B shape, T=4096, 8 images x 256 tokens
    python -m dsvl_cli.bench.mmca --layers 8           # fewer layers: fits and runs faster
    python -m dsvl_cli.bench.mmca --tiny               # CPU smoke run in seconds (dense MMCA)
    python -m dsvl_cli.bench.mmca --json out.json      # also write the rows as JSON

The decoder has random weights and is frozen; each step is one forward + backward with the
gradient flowing into `inputs_embeds` (as when only the projector trains). MMCA masks are built
inside every timed step, as the model does. MFU counts 4 x P x tokens FLOPs per step (2 forward,
2 backward for input gradients only; no weight gradients), P = parameters without the input
embedding table (unused with inputs_embeds), lm_head included; attention FLOPs are not counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from dsvl_cli.log import get_logger, setup_logging
from dsvl_cli.model.hf_compat import enable_activation_checkpointing
from dsvl_cli.model.mmca import (
    IMAGE,
    MMCA_ATTN_NAME,
    TEXT,
    MMCAMasks,
    build_mmca_masks,
    register_mmca,
)

log = get_logger(__name__)

SDPA = "sdpa"


@dataclass(frozen=True)
class BenchResult:
    """One row of the benchmark table."""

    impl: str
    kernel: str
    tokens_per_s: float
    step_ms: float
    mfu: float | None
    peak_mem_gib: float | None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line flags; --tiny replaces the model and sequence shapes with CPU-sized ones."""
    p = argparse.ArgumentParser(prog="python -m dsvl_cli.bench.mmca", description=__doc__)
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (smoke test)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--tokens-per-image", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--layers", type=int, default=32, help="decoder layers (7B has 32)")
    p.add_argument("--kv-heads", type=int, default=32, help="key/value heads (7B has 32)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (flex compiles here)")
    p.add_argument("--mmca-impl", choices=["auto", "dense", "flex"], default="auto")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing on")
    p.add_argument("--verify", action="store_true", help="log |loss(flex) - loss(dense)| first")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM bf16 dense peak")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.tiny:
        args.seq_len, args.images, args.tokens_per_image = 64, 2, 8
        args.layers, args.steps, args.warmup = 2, 2, 1
    if args.seq_len - args.images * args.tokens_per_image < args.images + 1:
        p.error("--seq-len must leave at least one text token around every image")
    return args


def model_config(args: argparse.Namespace) -> LlamaConfig:
    """LLaMA-2-7B shape (or a tiny one) with the requested number of layers and kv heads."""
    if args.tiny:
        return LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=args.layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=100,
            max_position_embeddings=args.seq_len,
        )
    return LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=args.kv_heads,
        vocab_size=32000,
        max_position_embeddings=max(4096, args.seq_len),
    )


def modality_layout(
    seq_len: int, images: int, tokens_per_image: int, batch: int, device: torch.device
) -> torch.Tensor:
    """[batch, seq_len] modality ids: equal text segments around `images` image blocks."""
    segment = (seq_len - images * tokens_per_image) // (images + 1)
    index = torch.arange(images, device=device)
    starts = (index + 1) * segment + index * tokens_per_image
    pos = torch.arange(seq_len, device=device)[:, None]
    is_image = ((pos >= starts) & (pos < starts + tokens_per_image)).any(dim=-1)
    return torch.where(is_image, IMAGE, TEXT).expand(batch, -1)


def build_model(args: argparse.Namespace, device: torch.device) -> PreTrainedModel:
    """A random-weight frozen decoder on `device` (bf16 on CUDA, fp32 elsewhere)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    register_mmca()
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(model_config(args), dtype=dtype)
    model.requires_grad_(False)
    model.train()  # no dropout in LLaMA; training mode is what checkpointing needs
    if args.grad_ckpt:
        enable_activation_checkpointing(model)
    return model


def _step(
    model: PreTrainedModel,
    embeds: torch.Tensor,
    labels: torch.Tensor,
    masks_fn: Callable[[], MMCAMasks] | None,
) -> None:
    kwargs = {} if masks_fn is None else {"mmca_masks": masks_fn()}
    loss = model(inputs_embeds=embeds, labels=labels, use_cache=False, **kwargs).loss
    loss.backward()
    embeds.grad = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(run: Callable[[], None], args: argparse.Namespace, device: torch.device) -> float:
    """Seconds per step over `args.steps` steps after `args.warmup` untimed ones."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        run()
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        run()
    _sync(device)
    return (time.perf_counter() - start) / args.steps


def bench_impl(
    model: PreTrainedModel,
    impl: str,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    args: argparse.Namespace,
) -> BenchResult:
    """Time one attention implementation on the shared model and inputs."""
    embeds, labels, modality = inputs
    device = embeds.device
    model.set_attn_implementation(impl)
    masks_fn = None
    kernel = "causal (is_causal)"
    if impl == MMCA_ATTN_NAME:
        masks_fn = functools.partial(build_mmca_masks, modality, impl=args.mmca_impl)
        kernel = f"mmca {masks_fn().impl}"
    step_s = time_steps(functools.partial(_step, model, embeds, labels, masks_fn), args, device)
    tokens_per_s = embeds.shape[0] * embeds.shape[1] / step_s
    params = sum(p.numel() for p in model.parameters())
    params -= model.get_input_embeddings().weight.numel()
    on_cuda = device.type == "cuda"
    return BenchResult(
        impl=impl,
        kernel=kernel,
        tokens_per_s=tokens_per_s,
        step_ms=step_s * 1e3,
        mfu=4 * params * tokens_per_s / (args.peak_tflops * 1e12) if on_cuda else None,
        peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else None,
    )


def verify(model: PreTrainedModel, inputs: tuple[torch.Tensor, ...]) -> float:
    """|loss(flex) - loss(dense)| for MMCA on the benchmark inputs (one forward each)."""
    embeds, labels, modality = inputs
    model.set_attn_implementation(MMCA_ATTN_NAME)
    losses = []
    with torch.no_grad():
        for impl in ("flex", "dense"):
            masks = build_mmca_masks(modality, impl=impl)
            losses.append(model(inputs_embeds=embeds, labels=labels, mmca_masks=masks).loss)
    return (losses[0] - losses[1]).abs().item()


def render(results: list[BenchResult], console: Console) -> None:
    """Print the results table and the MMCA/SDPA throughput ratio."""
    table = Table(title="MMCA vs causal SDPA (frozen decoder, grad into inputs_embeds)")
    for column in ("attention", "kernel", "tokens/s", "step ms", "MFU", "peak GiB"):
        table.add_column(column, justify="left" if column in ("attention", "kernel") else "right")
    for r in results:
        mfu = "-" if r.mfu is None else f"{100 * r.mfu:.1f}%"
        mem = "-" if r.peak_mem_gib is None else f"{r.peak_mem_gib:.1f}"
        table.add_row(r.impl, r.kernel, f"{r.tokens_per_s:,.0f}", f"{r.step_ms:.1f}", mfu, mem)
    console.print(table)
    ratio = results[1].tokens_per_s / results[0].tokens_per_s
    console.print(f"MMCA/SDPA throughput ratio: {ratio:.3f} (target >= 0.95)")


def write_json(
    path: Path,
    args: argparse.Namespace,
    device: torch.device,
    results: list[BenchResult],
    diff: float | None,
) -> None:
    """The rows, the MMCA/SDPA ratio, |loss(flex) - loss(dense)| (or null) and the shapes."""
    report = {
        "device": device.type,
        "seq_len": args.seq_len,
        "images": args.images,
        "tokens_per_image": args.tokens_per_image,
        "batch_size": args.batch_size,
        "layers": args.layers,
        "steps": args.steps,
        "results": [dataclasses.asdict(r) for r in results],
        "mmca_sdpa_ratio": results[1].tokens_per_s / results[0].tokens_per_s,
        "verify_abs_diff": diff,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> list[BenchResult]:
    """Run the benchmark and print its table; returns the rows (sdpa first, then MMCA)."""
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    model = build_model(args, device)
    batch, hidden = args.batch_size, model.config.hidden_size
    generator = torch.Generator(device=device).manual_seed(0)
    embeds = torch.randn(
        batch, args.seq_len, hidden, device=device, dtype=model.dtype, generator=generator
    ).requires_grad_(True)
    labels = torch.randint(
        0, model.config.vocab_size, (batch, args.seq_len), device=device, generator=generator
    )
    modality = modality_layout(args.seq_len, args.images, args.tokens_per_image, batch, device)
    inputs = (embeds, labels, modality)
    shape = f"batch {batch} x {args.seq_len} tokens ({args.images} x {args.tokens_per_image} image)"
    log.info("bench: %s, %d layers, %s, grad ckpt %s", device, args.layers, shape, args.grad_ckpt)
    diff = None
    if args.verify:
        diff = verify(model, inputs)
        log.info("MMCA |loss(flex) - loss(dense)| = %.3e", diff)
    results = [bench_impl(model, impl, inputs, args) for impl in (SDPA, MMCA_ATTN_NAME)]
    render(results, Console())
    if args.json is not None:
        write_json(args.json, args, device, results, diff)
    return results


if __name__ == "__main__":
    setup_logging()
    main()
