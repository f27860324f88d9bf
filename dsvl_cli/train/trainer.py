"""`dsvl train`: fit / train_step / evaluate on a DeepSpeed engine, with exact resume.

Loss: per optimiser step, sum of token losses over every supervised token of every micro-batch on
every rank, divided by the global supervised-token count (gathered before the backward passes),
so long and short answers weigh the same wherever they land. A micro-batch with no supervised
token contributes zero, never NaN.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from dsvl_cli import dist
from dsvl_cli.config import Config, save_config
from dsvl_cli.data.blend import blend_manifest, load_blend, write_blend_report
from dsvl_cli.data.collate import Batch, Collator
from dsvl_cli.data.dataset import ConversationDataset, SkipCounter, make_loader, set_epoch
from dsvl_cli.errors import DsvlError
from dsvl_cli.log import console, get_logger
from dsvl_cli.model.builder import Built, build_model
from dsvl_cli.train.checkpoint import TrainState, find_resume, load_checkpoint, save_checkpoint
from dsvl_cli.train.engine import (
    check_epoch_fits_a_step,
    deepspeed_config,
    gradient_accumulation_steps,
)
from dsvl_cli.train.export import export_model
from dsvl_cli.train.metrics import MetricsWriter
from dsvl_cli.train.native_ops import check_cpu_adam
from dsvl_cli.train.optim import (
    build_optimizer,
    build_scheduler,
    param_groups,
    total_steps,
    trainable_table,
)
from dsvl_cli.train.progress import TrainProgress
from dsvl_cli.train.run_dir import prepare_run_dir

log = get_logger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingError(DsvlError):
    """Training cannot go on (non-finite loss with on_nonfinite=stop, too many bad samples)."""


@dataclass
class Run:
    """Everything one training run holds on to."""

    config: Config
    built: Built
    engine: Any
    blend: Any
    collator: Collator
    device: torch.device
    grad_accum: int
    output_dir: Path
    metrics: MetricsWriter
    steps_per_epoch: int = 0
    state: TrainState = field(default_factory=TrainState)
    skips: SkipCounter = field(default_factory=SkipCounter)
    losses: list[float] = field(default_factory=list)


@dataclass
class FitResult:
    steps: int
    losses: list[float]
    eval_loss: float | None
    output_dir: Path


def _seed(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _dataset(run: Run, split: Any) -> ConversationDataset:
    model, cfg = run.built.model, run.config
    return ConversationDataset(
        split.conversations,
        split.base_dirs,
        tokenizer=run.built.tokenizer,
        image_token_id=model.image_token_id,
        tokens_per_image=model.tokens_per_image,
        image_transform=run.built.image_transform,
        image_size=model.vision.image_size,
        max_seq_len=cfg.model.max_seq_len,
        overlength=cfg.data.overlength,
        max_images=cfg.model.max_images_per_sample,
        max_round_tokens=cfg.data.max_round_tokens,
    )


def _loader(run: Run, split: Any, train: bool) -> Any:
    cfg = run.config
    return make_loader(
        _dataset(run, split),
        batch_size=cfg.train.micro_batch_size if train else cfg.train.eval_batch_size,
        collate_fn=run.collator,
        shuffle=train,
        seed=cfg.data.seed,
        workers=cfg.data.workers,
        drop_last=train,
        rank=dist.rank(),
        world_size=dist.world_size(),
    )


def _empty_inputs(run: Run) -> dict[str, torch.Tensor]:
    """A one-token, unsupervised input for ranks whose batch was entirely skipped."""
    pad = run.built.tokenizer.pad_token_id
    ids = torch.tensor([[pad]], device=run.device)
    return {"input_ids": ids, "labels": torch.full_like(ids, -100)}


def _inputs(run: Run, batch: Batch) -> dict[str, torch.Tensor]:
    if batch.is_empty:
        return _empty_inputs(run)
    batch = batch.to(run.device)
    pixels = batch.pixel_values if batch.pixel_values.shape[0] > 0 else None
    if pixels is not None:
        pixels = pixels.to(DTYPES[run.config.distributed.precision])
    return {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "labels": batch.labels,
        "pixel_values": pixels,
    }


def _supervised(batch: Batch) -> int:
    return 0 if batch.is_empty else int((batch.labels[:, 1:] != -100).sum())


def train_step(run: Run, window: list[Batch]) -> tuple[float, int]:
    """One optimiser step over `grad_accum` micro-batches; returns (mean loss, input tokens)."""
    engine, scale = run.engine, run.grad_accum * dist.world_size()
    counts = torch.tensor([sum(_supervised(b) for b in window)], dtype=torch.float64)
    global_tokens = max(float(dist.all_reduce_sum(counts.to(run.device)).item()), 1.0)
    loss_total = torch.zeros((), dtype=torch.float64, device=run.device)
    for batch in window:
        run.skips.update(batch)
        out = engine(**_inputs(run, batch))
        bad = torch.tensor([0.0 if torch.isfinite(out.loss_sum) else 1.0], device=run.device)
        if dist.all_reduce_max(bad).item() > 0:
            _on_nonfinite(run, batch)
            # Drop this micro-batch but keep every rank's backward/step sequence identical:
            # an unsupervised dummy input gives a finite zero loss with a connected graph.
            out = engine(**_empty_inputs(run))
        else:
            loss_total += out.loss_sum.detach().double()
        engine.backward(out.loss_sum * scale / global_tokens)
        engine.step()
    loss = float(dist.all_reduce_sum(loss_total).item()) / global_tokens
    tokens = torch.tensor([sum(0 if b.is_empty else int(b.attention_mask.sum()) for b in window)])
    return loss, int(dist.all_reduce_sum(tokens.to(run.device)).item())


def _on_nonfinite(run: Run, batch: Batch) -> None:
    ids = ", ".join(batch.ids[:4])
    message = f"non-finite loss at step {run.state.step + 1} (samples: {ids})"
    if run.config.train.on_nonfinite == "stop":
        raise TrainingError(
            f"{message}; lower optim.lr, use distributed.precision=bf16 or fp32, or set "
            "train.on_nonfinite=skip"
        )
    log.warning("%s: micro-batch skipped (train.on_nonfinite=skip)", message)


@torch.no_grad()
def evaluate(run: Run, loader: Any) -> dict[str, float]:
    """Teacher-forced loss and perplexity over the eval split, summed over ranks."""
    run.engine.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=run.device)
    for batch in loader:
        out = run.engine(**_inputs(run, batch))
        totals[0] += out.loss_sum.double()
        totals[1] += out.num_tokens.double()
    run.engine.train()
    dist.all_reduce_sum(totals)
    loss = float(totals[0] / totals[1].clamp(min=1))
    return {
        "eval/loss": loss,
        "eval/ppl": math.exp(min(loss, 50.0)),
        "eval/tokens": float(totals[1]),
    }


def _epoch_done(run: Run) -> bool:
    """True once the epoch in progress has had its last full step (see _run_epoch)."""
    return run.state.batches_in_epoch >= run.steps_per_epoch * run.grad_accum


def epochs_completed(run: Run) -> int:
    """Whole epochs trained so far: `epoch` in every export's meta.json (epoch-K/ says K)."""
    return run.state.epoch + (1 if _epoch_done(run) else 0)


def _export(run: Run, name: str, eval_loss: float | None) -> None:
    meta = {"step": run.state.step, "epoch": epochs_completed(run), "eval_loss": eval_loss}
    path = export_model(run.engine.module, run.built, run.config, run.output_dir / name, meta)
    if path is not None:
        log.info("exported %s", path)


def _after_eval(run: Run, metrics: dict[str, float]) -> None:
    run.metrics.write(run.state.step, metrics)
    loss = metrics["eval/loss"]
    log.info("step %d eval loss %.4f ppl %.2f", run.state.step, loss, metrics["eval/ppl"])
    best = run.state.best_eval_loss
    if best is None or loss < best:
        run.state.best_eval_loss = loss
        _export(run, "best", loss)


def _log_step(run: Run, loss: float, tokens: int, seconds: float, progress: TrainProgress) -> None:
    lr = run.engine.get_lr()[0] if run.engine.get_lr() else 0.0
    values = {"train/loss": loss, "train/lr": lr, "train/tokens_per_s": tokens / max(seconds, 1e-9)}
    progress.update(run.state.step, run.state.epoch, loss, lr, tokens, seconds)
    if run.state.step % run.config.train.log_every == 0:
        skipped = run.skips.total
        run.metrics.write(run.state.step, {**values, "data/skipped": skipped})
        run.skips.check(run.config.data.max_failure_fraction)


def _run_epoch(run: Run, epoch: int, eval_loader: Any, progress: TrainProgress, total: int) -> bool:
    """Train one epoch (from the resume point); returns False when max_steps was reached."""
    cfg, state = run.config.train, run.state
    loader = _loader(run, run.blend.train_split(epoch), train=True)
    skip = state.batches_in_epoch if epoch == state.epoch else 0
    set_epoch(loader, epoch, skip_batches=skip)
    state.epoch, state.batches_in_epoch = epoch, skip
    batches = iter(loader)
    while window := list(islice(batches, run.grad_accum)):
        if len(window) < run.grad_accum:
            break  # an incomplete accumulation window at the epoch's end is dropped
        start = time.perf_counter()
        loss, tokens = train_step(run, window)
        state.step += 1
        state.batches_in_epoch += run.grad_accum
        run.losses.append(loss)
        _log_step(run, loss, tokens, time.perf_counter() - start, progress)
        if cfg.eval_every and state.step % cfg.eval_every == 0:
            _after_eval(run, evaluate(run, eval_loader))
        if cfg.save_every and state.step % cfg.save_every == 0:
            state.skips = run.skips.state_dict()
            save_checkpoint(run.engine, state, run.output_dir, cfg.keep_last)
        if state.step >= total:
            return False
    return True


def _initialize(config: Config) -> tuple[Run, Any, int]:
    import deepspeed

    dist.init()
    _seed(config.train.seed)
    world = dist.world_size()
    ds_config = deepspeed_config(config, world)
    built = build_model(config, dtype=DTYPES[config.distributed.precision], ds_config=ds_config)
    model = built.model
    model.run_vision_without_images = world > 1
    if config.train.gradient_checkpointing:
        model.language_model.gradient_checkpointing_enable({"use_reentrant": False})
        model.vision.gradient_checkpointing_enable()
    blend = load_blend(config.data, config.model.max_images_per_sample)
    pad = built.tokenizer.pad_token_id
    run = Run(config, built, None, blend, Collator(pad), dist.device(), 0, Path(), None)  # type: ignore[arg-type]
    run.grad_accum = gradient_accumulation_steps(config, world)
    run.output_dir = Path(config.train.output_dir)
    batches = len(_loader(run, blend.train_split(0), train=True))
    check_epoch_fits_a_step(config, world, batches)
    # Incomplete accumulation windows at an epoch's end are dropped (see _run_epoch).
    run.steps_per_epoch = batches // run.grad_accum
    full = run.steps_per_epoch * run.grad_accum
    total = total_steps(full, run.grad_accum, config.train.epochs, config.train.max_steps)
    optimizer = build_optimizer(model, config)
    if dist.is_main():
        console.print(trainable_table(model, param_groups(model, config)))
    scheduler = build_scheduler(optimizer, config, total)
    run.engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return run, blend, total


def _prepare_output(run: Run) -> None:
    run.output_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main():
        save_config(run.config, run.output_dir / "config.yaml")
        report = blend_manifest(run.blend, 0, run.blend.train_split(0))
        write_blend_report(run.output_dir / "blend.json", report)
    run.metrics = MetricsWriter(run.output_dir, run.config.train.tensorboard)


def _train_epochs(run: Run, eval_loader: Any, total: int) -> float | None:
    """Train from the current state to `total` steps; returns the last eval loss.

    Each epoch that ends (all its full steps done) is exported as epoch-K, K counting from 1.
    """
    cfg, metrics = run.config.train, {}
    with TrainProgress(total, cfg.epochs, start=run.state.step, log_every=cfg.log_every) as bar:
        for epoch in range(run.state.epoch, cfg.epochs):
            more = _run_epoch(run, epoch, eval_loader, bar, total)
            metrics = evaluate(run, eval_loader)
            _after_eval(run, metrics)
            if more or _epoch_done(run):
                run.state.epoch, run.state.batches_in_epoch = epoch + 1, 0
                _export(run, f"epoch-{epoch + 1}", metrics["eval/loss"])
            if not more:
                break
    return metrics.get("eval/loss")


def _resume(run: Run) -> None:
    cfg = run.config.train
    resume = None if cfg.overwrite else find_resume(run.output_dir, cfg.resume)
    if resume is not None:
        run.state = load_checkpoint(run.engine, resume)
        run.skips.load_state_dict(run.state.skips)
        log.info("resumed from %s at step %d", resume, run.state.step)


def fit(config: Config) -> FitResult:
    """Train as the config says: resume if asked, evaluate, checkpoint, export."""
    prepare_run_dir(config.train)
    check_cpu_adam(config)
    run, blend, total = _initialize(config)
    _prepare_output(run)
    _resume(run)
    eval_loader = _loader(run, blend.eval_split(), train=False)
    if run.state.step == 0:
        _after_eval(run, evaluate(run, eval_loader))
    if run.state.step < total:
        eval_loss = _train_epochs(run, eval_loader, total)
    else:
        log.info("the checkpoint is at step %d of %d: nothing left to train", run.state.step, total)
        eval_loss = evaluate(run, eval_loader)["eval/loss"]
    _export(run, "final", eval_loss)
    run.metrics.close()
    log.info("skipped samples: %s", run.skips.summary() or "none")
    return FitResult(run.state.step, run.losses, eval_loss, run.output_dir)
