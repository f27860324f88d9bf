"""Reload a training export the way chat and eval do, and check what it computes.

    python -m dsvl_cli.bench.export_probe OUTPUT_DIR/final --eval-jsonl DATA/eval.jsonl \
        --device cuda --dtype bf16 --batch-size 16 --json probe.json

Loads the folder with the library's `load_model_folder` (rebuilds the base models, loads the
trained weights and adapters), runs one forward without labels on the first eval batch and checks
that every logit is finite, then computes the teacher-forced loss over the whole eval file with
the training data path (`ConversationDataset` + `Collator`, the folder's own config limits), to
compare with the run's last `eval/loss`. Writes the facts as JSON; exits 1 on non-finite logits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from dsvl_cli.config import load_config
from dsvl_cli.data.collate import Batch, Collator
from dsvl_cli.data.conversation import read_jsonl
from dsvl_cli.data.dataset import ConversationDataset
from dsvl_cli.data.encoder import SampleEncoder
from dsvl_cli.inference.loader import resolve_device, resolve_dtype
from dsvl_cli.log import get_logger, setup_logging
from dsvl_cli.model.builder import Built

log = get_logger(__name__)

DTYPES = ("fp32", "bf16")
CONFIG_FILE = "config.yaml"


def load_export(folder: Path, dtype: torch.dtype, device: torch.device) -> Built:
    """The library's model-folder loader (in train/export.py before model/folder.py existed)."""
    try:
        from dsvl_cli.model.folder import load_model_folder
    except ImportError:
        from dsvl_cli.train.export import load_model_folder  # type: ignore[attr-defined,no-redef]
    return load_model_folder(folder, dtype=dtype, device=device)


def eval_loader(folder: Path, built: Built, eval_jsonl: Path, batch_size: int) -> DataLoader:
    """Batches of `eval_jsonl` (images relative to its folder) under the export's config limits."""
    encoder = SampleEncoder.from_built(built, load_config(folder / CONFIG_FILE))
    dataset = ConversationDataset(list(read_jsonl(eval_jsonl)), eval_jsonl.parent, encoder)
    collate = Collator(built.tokenizer.pad_token_id)
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collate)


def _inputs(batch: Batch, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    batch = batch.to(device)
    pixels = batch.pixel_values.to(dtype) if batch.pixel_values.shape[0] > 0 else None
    return {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "pixel_values": pixels,
    }


@torch.no_grad()
def probe(
    folder: Path, eval_jsonl: Path, device: torch.device, dtype: torch.dtype, batch_size: int
) -> dict[str, Any]:
    """Reload `folder`; logits of the first eval batch, and the eval loss (per supervised token)."""
    start = time.perf_counter()
    built = load_export(folder, dtype, device)
    load_s = time.perf_counter() - start
    model = built.model
    loss_sum, tokens, samples = 0.0, 0, 0
    logits_shape: list[int] | None = None
    finite = False
    for batch in eval_loader(folder, built, eval_jsonl, batch_size):
        if batch.is_empty:
            continue
        inputs = _inputs(batch, device, dtype)
        if logits_shape is None:
            logits = model(**inputs).logits
            logits_shape, finite = list(logits.shape), bool(torch.isfinite(logits).all())
        out = model(**inputs, labels=batch.labels.to(device))
        loss_sum += float(out.loss_sum)
        tokens += int(out.num_tokens)
        samples += batch.size
    return {
        "logits_finite": finite,
        "logits_shape": logits_shape,
        "eval_loss": loss_sum / tokens if tokens else None,
        "eval_tokens": tokens,
        "eval_samples": samples,
        "load_s": round(load_s, 1),
        "seconds": round(time.perf_counter() - start, 1),
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch."),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dsvl_cli.bench.export_probe", description=__doc__)
    p.add_argument("folder", type=Path, help="an export folder (output_dir/final, best, epoch-K)")
    p.add_argument("--eval-jsonl", type=Path, required=True, help="prepared eval conversations")
    p.add_argument("--device", default="auto", help="auto (cuda if visible), cpu, cuda")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bf16 on cuda")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", type=Path, default=None, help="write the facts here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Probe the export, log and optionally write the facts; exit 1 if a logit is not finite."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    facts = probe(args.folder, args.eval_jsonl, device, dtype, args.batch_size)
    log.info("export %s: %s", args.folder, facts)
    if args.json is not None:
        args.json.write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")
    if not facts["logits_finite"]:
        log.error("the reloaded export gives non-finite logits (or no eval batch was usable)")
        sys.exit(1)
    return facts


if __name__ == "__main__":
    setup_logging()
    main()
