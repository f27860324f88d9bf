"""Packed vs unpacked training steps on a realistic DSVL length mix.

    python -m dsvl_cli.bench.packing                  # CPU: small model, 96 samples
    python -m dsvl_cli.bench.packing --mmca off       # plain causal attention
    python -m dsvl_cli.bench.packing --shape 7b       # CUDA: LLaMA-2-7B-shaped decoder (bf16)
    python -m dsvl_cli.bench.packing --json out.json  # also write the rows as JSON

The mix (assumed, LLaVA-like): 10% text-only, 60% one image, 30% two to eight images; 257 tokens
per image (CLIP ViT-L/14 + CLS); text lengths log-normal around 130 tokens (clipped to
16..1500), 60% of it the supervised answer. Samples are the product's `Sample`s, batched by
the product's collators: unpacked, `--batch` samples per micro-batch padded to the longest
(rounded to a multiple of 8, as the original DSVL); packed, `--rows` rows of up to
`--max-seq-len` tokens planned by `packing.pack_epoch` (first-fit-decreasing). Each step is the
real `VisualChatModel` forward (vision tower frozen, as the recipes) + backward into the
projector and decoder, no optimiser update, so both passes score the same weights and report
the same mean loss over the same samples (the check that packing changes nothing but speed).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, LlamaConfig

from dsvl_cli.data.collate import Batch, Collator
from dsvl_cli.data.encoder import Sample
from dsvl_cli.data.packing import PackedCollator, pack_epoch
from dsvl_cli.data.template import IGNORE_INDEX
from dsvl_cli.log import get_logger, setup_logging
from dsvl_cli.model.mmca import MMCA_ATTN_NAME, register_mmca
from dsvl_cli.model.projector import LinearProjector
from dsvl_cli.model.vision import ClipVisionEncoder
from dsvl_cli.model.vlm import VisualChatModel

log = get_logger(__name__)
VOCAB = 32000
IMAGE_ID = VOCAB - 1


@dataclass(frozen=True)
class PassResult:
    """One row: how a pass over every sample went."""

    mode: str
    micro_batches: int
    padding_fraction: float
    samples_per_s: float
    supervised_tokens_per_s: float
    mean_loss: float


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dsvl_cli.bench.packing", description=__doc__)
    p.add_argument("--shape", choices=["small", "7b"], default="small")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (small 4, 7b 8)")
    p.add_argument("--hidden", type=int, default=512, help="small shape's hidden size")
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--batch", type=int, default=4, help="unpacked samples per micro-batch")
    p.add_argument("--rows", type=int, default=1, help="packed rows per micro-batch")
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--mmca", choices=["on", "off"], default="on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def realistic_samples(n: int, seed: int, tokens_per_image: int, max_len: int) -> list[Sample]:
    """`n` samples of the mix in the module docstring (random ids, random pixels)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        draw = float(torch.rand((), generator=g))
        images = 0 if draw < 0.1 else 1 if draw < 0.7 else int(torch.randint(2, 9, (), generator=g))
        text = int(torch.empty(()).log_normal_(4.87, 0.8, generator=g).clamp(16, 1500))
        text = max(16, min(text, max_len - images * tokens_per_image))
        answer = max(1, int(text * 0.6))
        prompt = torch.randint(1, VOCAB - 1, (text - answer,), generator=g)
        image_ids = torch.full((images * tokens_per_image,), IMAGE_ID)
        reply = torch.randint(1, VOCAB - 1, (answer,), generator=g)
        ids = torch.cat([image_ids, prompt, reply])
        labels = torch.cat([torch.full((len(ids) - answer,), IGNORE_INDEX), reply])
        pixels = torch.randn(images, 3, 64, 64, generator=g)
        out.append(Sample(ids, labels, pixels, images, f"s{i}"))
    return out


def build(args: argparse.Namespace, device: torch.device) -> VisualChatModel:
    """A random-weight VLM: CLIP tower giving 257 tokens, linear projector, LLaMA decoder."""
    register_mmca()
    torch.manual_seed(0)
    small = args.shape == "small"
    layers = args.layers or (4 if small else 8)
    lm_config = LlamaConfig(
        hidden_size=args.hidden if small else 4096,
        intermediate_size=args.hidden * 8 // 3 if small else 11008,
        num_hidden_layers=layers,
        num_attention_heads=max(1, args.hidden // 64) if small else 32,
        num_key_value_heads=max(1, args.hidden // 64) if small else 32,
        vocab_size=VOCAB,
        max_position_embeddings=args.max_seq_len,
    )
    attn = MMCA_ATTN_NAME if args.mmca == "on" else "sdpa"
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    vision_cfg = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        image_size=64, patch_size=4,
    )  # fmt: skip
    with device:
        lm = AutoModelForCausalLM.from_config(lm_config, attn_implementation=attn, dtype=dtype)
        vision = ClipVisionEncoder(CLIPVisionModel(vision_cfg)).requires_grad_(False)
        projector = LinearProjector(64, lm_config.hidden_size, vision.num_tokens)
    model = VisualChatModel(vision, projector, lm, IMAGE_ID, mmca=args.mmca == "on")
    return model.to(device=device, dtype=dtype).train()


def micro_batches(samples: list[Sample], args: argparse.Namespace, packed: bool) -> list[Batch]:
    """The product's batches of `samples`, in one shuffled order (same for both modes)."""
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(args.seed))
    if packed:
        lengths = [len(s.input_ids) for s in samples]
        rows = pack_epoch(lengths, args.max_seq_len, args.seed, epoch=0)
        collate = PackedCollator(0)
        groups = [
            [[samples[i] for i in row] for row in rows[k : k + args.rows]]
            for k in range(0, len(rows), args.rows)
        ]
        return [collate(group) for group in groups]
    ordered = [samples[i] for i in order.tolist()]
    collate = Collator(0, pad_to_multiple_of=8)
    return [collate(ordered[k : k + args.batch]) for k in range(0, len(ordered), args.batch)]


def run_pass(model: VisualChatModel, batches: list[Batch], mode: str) -> PassResult:
    """Forward + backward over every batch (weights unchanged); throughput and mean loss."""
    device = next(model.parameters()).device
    real = sum(int(b.attention_mask.sum()) for b in batches)
    total = sum(b.input_ids.numel() for b in batches)
    samples = sum(b.size for b in batches)
    loss_sum, tokens = 0.0, 0
    _run(model, batches[0], device)  # warm-up (allocator, kernels); not counted
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        out = _run(model, batch, device)
        loss_sum += float(out.loss_sum.detach())  # type: ignore[attr-defined]
        tokens += int(out.num_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return PassResult(
        mode, len(batches), 1 - real / total, samples / seconds, tokens / seconds, loss_sum / tokens
    )


def _run(model: VisualChatModel, batch: Batch, device: torch.device) -> object:
    batch = batch.to(device)
    dtype = next(model.mm_projector.parameters()).dtype
    extra = {}
    if batch.sequence_ids is not None:
        extra = {"sequence_ids": batch.sequence_ids, "position_ids": batch.position_ids}
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        labels=batch.labels,
        pixel_values=batch.pixel_values.to(dtype) if batch.pixel_values.shape[0] else None,
        **extra,
    )
    out.loss_sum.backward()  # type: ignore[attr-defined]
    return out


def render(rows: list[PassResult], console: Console) -> None:
    table = Table(title="packing benchmark")
    for name in ("mode", "micro-batches", "padding", "samples/s", "sup. tokens/s", "mean loss"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(
            r.mode, str(r.micro_batches), f"{r.padding_fraction:.1%}", f"{r.samples_per_s:.2f}",
            f"{r.supervised_tokens_per_s:.0f}", f"{r.mean_loss:.5f}",
        )  # fmt: skip
    console.print(table)
    ratio = rows[1].samples_per_s / rows[0].samples_per_s
    console.print(f"packed/unpacked samples/s: {ratio:.2f}x")


def main(argv: Sequence[str] | None = None) -> list[PassResult]:
    """Run both passes, print the table; returns [unpacked, packed]."""
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.shape == "7b" and device.type != "cuda":
        raise SystemExit("--shape 7b needs a CUDA device; use the default small shape on CPU")
    model = build(args, device)
    samples = realistic_samples(args.samples, args.seed, model.tokens_per_image, args.max_seq_len)
    log.info(
        "bench: %s, %s shape, %d samples, %d tokens on average, MMCA %s",
        device, args.shape, len(samples),
        sum(len(s.input_ids) for s in samples) // len(samples), args.mmca,
    )  # fmt: skip
    rows = [
        run_pass(model, micro_batches(samples, args, packed), mode)
        for packed, mode in ((False, f"unpacked x{args.batch}"), (True, f"packed x{args.rows}"))
    ]
    render(rows, Console())
    if args.json is not None:
        report = {"args": {k: str(v) for k, v in vars(args).items()}, "device": str(device)}
        report["rows"] = [asdict(r) for r in rows]
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return rows


if __name__ == "__main__":
    setup_logging()
    main()
