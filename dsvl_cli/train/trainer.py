"""`dsvl train`: the `Trainer` owns one run on a DeepSpeed engine, with exact resume.

Loss: per optimiser step, sum of token losses over every supervised token of every micro-batch on
every rank, divided by the global supervised-token count (gathered before the backward passes),
so long and short answers weigh the same wherever they land. A micro-batch with no supervised
token contributes zero, never NaN.

Every rank runs the same collectives whatever its micro-batch holds: an empty micro-batch (all
its samples skipped) runs a zero-loss placeholder, a micro-batch without images still runs the
vision tower (`VisualChatModel.run_vision_without_images`), and evaluation equalises batch counts.
Resume, logging, skip accounting and metric aggregation live here; `state_dict()` is what a
checkpoint stores.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsvl_cli import dist
from dsvl_cli.config import Config, save_config
from dsvl_cli.data.blend import blend_manifest, load_blend, write_blend_report
from dsvl_cli.data.collate import Batch, Collator
from dsvl_cli.data.dataset import SkipCounter, set_epoch
from dsvl_cli.errors import DataError
from dsvl_cli.log import console, get_logger
from dsvl_cli.model.builder import build_model
from dsvl_cli.model.trainable import check_trainable
from dsvl_cli.train import batches as B
from dsvl_cli.train.checkpoint import (
    TrainState,
    find_resume,
    load_checkpoint,
    repair_exports,
    save_checkpoint,
)
from dsvl_cli.train.deepspeed_bugs import check_gloo_zero3
from dsvl_cli.train.engine import (
    check_epoch_fits_a_step,
    deepspeed_config,
    gradient_accumulation_steps,
)
from dsvl_cli.train.evaluation import evaluate
from dsvl_cli.train.export import export_model
from dsvl_cli.train.metrics import MetricsWriter
from dsvl_cli.train.native_ops import check_cpu_adam
from dsvl_cli.train.nonfinite import (
    NonFiniteGuard,
    TrainingError,
    any_rank,
    check_after_step,
    check_eval,
    no_update,
)
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
__all__ = ["FitResult", "Trainer", "TrainingError", "fit"]


@dataclass
class FitResult:
    steps: int
    losses: list[float]
    eval_loss: float | None
    output_dir: Path


@dataclass
class StepResult:
    """One optimiser step: mean loss (NaN if every micro-batch was skipped), input tokens."""

    loss: float
    tokens: int
    skipped: bool


class Trainer:
    """One training run: model, data, DeepSpeed engine, state, metrics, exports.

    Build it from a validated config (this initialises the process group, builds the model and
    the engine), then `fit()`. `state_dict()` / `load_state_dict()` cover everything a resumed
    run needs beyond the engine's own checkpoint (step, epoch position, best eval loss, skip and
    non-finite counts).
    """

    def __init__(self, config: Config) -> None:
        prepare_run_dir(config.train)
        check_cpu_adam(config)
        dist.init()
        _seed(config.train.seed)
        self.config, self.world, self.device = config, dist.world_size(), dist.device()
        check_gloo_zero3(config, self.world, cuda=self.device.type == "cuda")
        self.precision = config.distributed.precision
        ds_config = deepspeed_config(config, self.world)
        dtype = B.DTYPES[self.precision]
        self.built = build_model(config, dtype=dtype, ds_config=ds_config, training=True)
        model = self.built.model
        model.run_vision_without_images = self.world > 1
        self.blend = load_blend(config.data, config.model.max_images_per_sample)
        self.collator = Collator(self.built.tokenizer.pad_token_id)
        self.output_dir = Path(config.train.output_dir)
        self.grad_accum = gradient_accumulation_steps(config, self.world)
        first_split = self.blend.train_split(0)
        self.blend_report = blend_manifest(self.blend, 0, first_split)
        eval_split = self.blend.eval_split()
        self.pixel_cache = B.pixel_cache(config, self.built, first_split, eval_split)
        self.token_cache = B.token_cache(config)
        first_loader = B.train_loader(
            config, self.built, first_split, self.collator, self.pixel_cache, self.token_cache
        )
        loader_batches = len(first_loader)
        check_epoch_fits_a_step(config, self.world, loader_batches)
        # Incomplete accumulation windows at an epoch's end are dropped (see _run_epoch).
        self.steps_per_epoch = loader_batches // self.grad_accum
        full = self.steps_per_epoch * self.grad_accum
        self.total = total_steps(full, self.grad_accum, config.train.epochs, config.train.max_steps)
        self.engine = self._engine(ds_config)
        self.state = TrainState()
        self.skips = SkipCounter()
        self.guard = NonFiniteGuard(config.train.on_nonfinite, config.train.max_nonfinite_steps)
        self.losses: list[float] = []
        self.last_checkpoint: str | None = None
        self.metrics: MetricsWriter | None = None
        self.eval_loader = B.eval_loader(
            config, self.built, eval_split, self.collator, self.pixel_cache, self.token_cache
        )

    def _engine(self, ds_config: dict[str, Any]) -> Any:
        import deepspeed

        model, config = self.built.model, self.config
        optimizer = build_optimizer(model, config, self.device)
        if dist.is_main():
            console.print(trainable_table(model, param_groups(model, config)))
        scheduler = build_scheduler(optimizer, config, self.total)
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        check_trainable(engine.module, config)  # the engine must not have changed what trains
        return engine

    # ------------------------------------------------------------------ state

    def state_dict(self) -> TrainState:
        """Where the run stands (the engine's weights and optimiser are DeepSpeed's part)."""
        self.state.skips = self.skips.state_dict()
        self.state.nonfinite = self.guard.state_dict()
        return TrainState(**asdict(self.state))

    def load_state_dict(self, state: TrainState) -> None:
        self.state = state
        if state.skips:
            self.skips.load_state_dict(state.skips)
        self.guard.load_state_dict(state.nonfinite)

    # ------------------------------------------------------------------ run

    def fit(self) -> FitResult:
        """Train as the config says: resume if asked, evaluate, checkpoint, export."""
        resumed = self._resume()
        self._prepare_output(resumed)
        if self.state.step == 0:
            self._after_eval(self.evaluate())
        if self.state.step < self.total:
            eval_loss = self._train_epochs()
        else:
            log.info("the checkpoint is at step %d of %d: nothing left to train", *self._at())
            metrics = self.evaluate()
            eval_loss = metrics["eval/loss"]
            if eval_loss is not None:
                check_eval(eval_loss, self.state.step, self.last_checkpoint)
            if self.state.best_eval_loss is None:  # best/ was lost and could not be restored
                self._after_eval(metrics)
        self._export("final", eval_loss)
        assert self.metrics is not None
        self.metrics.close()
        log.info("skipped samples: %s", self._skip_summary() or "none")
        return FitResult(self.state.step, self.losses, eval_loss, self.output_dir)

    def _at(self) -> tuple[int, int]:
        return self.state.step, self.total

    def _resume(self) -> int | None:
        """Load the checkpoint `train.resume` points at; the step resumed from, or None."""
        cfg = self.config.train
        path = None if cfg.overwrite else find_resume(self.output_dir, cfg.resume)
        if path is None:
            return None
        self.load_state_dict(load_checkpoint(self.engine, path))
        self.last_checkpoint = str(path)
        log.info("resumed from %s at step %d", path, self.state.step)
        # A kill during an export leaves its complete copy aside: put it back, or re-export.
        repair_exports(self.output_dir, self.state)
        return self.state.step

    def _prepare_output(self, resumed: int | None) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if dist.is_main():
            save_config(self.config, self.output_dir / "config.yaml")
            write_blend_report(self.output_dir / "blend.json", self.blend_report)
        self.metrics = MetricsWriter(self.output_dir, self.config.train.tensorboard, resumed)

    def _train_epochs(self) -> float | None:
        """Train from the current state to the last step; returns the last eval loss.

        Each epoch that ends (all its full steps done) is exported as epoch-K, K counting from 1.
        """
        cfg, metrics = self.config.train, {}
        progress = TrainProgress(self.total, cfg.epochs, self.state.step, cfg.log_every)
        with progress:
            for epoch in range(self.state.epoch, cfg.epochs):
                more = self._run_epoch(epoch, progress)
                metrics = self.evaluate()
                self._after_eval(metrics)
                if more or self._epoch_done():
                    self.state.epoch, self.state.batches_in_epoch = epoch + 1, 0
                    self._export(f"epoch-{epoch + 1}", metrics["eval/loss"])
                if not more:
                    break
        return metrics.get("eval/loss")

    def _run_epoch(self, epoch: int, progress: TrainProgress) -> bool:
        """Train one epoch (from the resume point); returns False when the last step is done."""
        cfg, state = self.config.train, self.state
        split = self.blend.train_split(epoch)
        loader = B.train_loader(
            self.config, self.built, split, self.collator, self.pixel_cache, self.token_cache
        )
        skip = state.batches_in_epoch if epoch == state.epoch else 0
        set_epoch(loader, epoch, skip_batches=skip)
        state.epoch, state.batches_in_epoch = epoch, skip
        batches = iter(loader)
        while window := list(islice(batches, self.grad_accum)):
            if len(window) < self.grad_accum:
                break  # an incomplete accumulation window at the epoch's end is dropped
            start = time.perf_counter()
            result = self.train_step(window)
            state.step += 1
            state.batches_in_epoch += self.grad_accum
            self.losses.append(result.loss)
            self._log_step(result, time.perf_counter() - start, progress)
            if cfg.eval_every and state.step % cfg.eval_every == 0:
                self._after_eval(self.evaluate())
            if cfg.save_every and state.step % cfg.save_every == 0:
                path = save_checkpoint(
                    self.engine, self.state_dict(), self.output_dir, cfg.keep_last
                )
                self.last_checkpoint = str(path)
            if state.step >= self.total:
                return False
        return True

    def _epoch_done(self) -> bool:
        """True once the epoch in progress has had its last full step (see _run_epoch)."""
        return self.state.batches_in_epoch >= self.steps_per_epoch * self.grad_accum

    # ------------------------------------------------------------------ steps

    def train_step(self, window: list[Batch]) -> StepResult:
        """One optimiser step over `grad_accum` micro-batches (see the module docstring)."""
        engine, scale = self.engine, self.grad_accum * self.world
        counts = torch.tensor([sum(B.supervised_tokens(b) for b in window)], dtype=torch.float64)
        global_tokens = max(float(dist.all_reduce_sum(counts.to(self.device)).item()), 1.0)
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
        dropped = 0
        for batch in window:
            self.skips.update(batch)
            out = engine(**B.model_inputs(batch, self.built, self.device, self.precision))
            if any_rank(not bool(torch.isfinite(out.loss_sum)), self.device):
                self.guard.bad_loss(self.state.step + 1, batch.ids, self.last_checkpoint)
                # Every rank drops this micro-batch but keeps its backward/step sequence: an
                # unsupervised placeholder gives a finite zero loss with a connected graph.
                out = engine(**B.placeholder_inputs(self.built, self.device))
                dropped += 1
            else:
                loss_total += out.loss_sum.detach().double()
            engine.backward(out.loss_sum * scale / global_tokens)
            with no_update(engine.optimizer, active=dropped == len(window)):
                engine.step()
        skipped = dropped == len(window)
        self.guard.end_step(self.state.step + 1, skipped, self.last_checkpoint)
        check_after_step(engine, self.state.step + 1, self._lr(), self.device, self.last_checkpoint)
        loss = float(dist.all_reduce_sum(loss_total).item()) / global_tokens
        tokens = torch.tensor([sum(B.input_tokens(b) for b in window)], device=self.device)
        total_tokens = int(dist.all_reduce_sum(tokens).item())
        return StepResult(float("nan") if skipped else loss, total_tokens, skipped)

    def evaluate(self) -> dict[str, float]:
        """Loss and perplexity over the eval split, each sample counted once across ranks."""
        return evaluate(self.engine, self.eval_loader, self.built, self.device, self.precision)

    def _lr(self) -> float:
        lrs = self.engine.get_lr()
        return float(lrs[0]) if lrs else 0.0

    def _after_eval(self, metrics: dict[str, Any]) -> None:
        assert self.metrics is not None
        self.metrics.write(self.state.step, metrics)
        loss, skipped = metrics["eval/loss"], int(metrics["eval/skipped"])
        step = self.state.step
        if skipped:
            log.warning("step %d: %d eval sample(s) skipped (unreadable images?)", step, skipped)
        if loss is None:
            log.warning("step %d: no eval token scored (no eval data); best/ is not chosen", step)
            return
        log.info("step %d eval loss %.4f ppl %.2f", self.state.step, loss, metrics["eval/ppl"])
        check_eval(loss, self.state.step, self.last_checkpoint)
        best = self.state.best_eval_loss
        if best is None or loss < best:
            self.state.best_eval_loss = loss
            self._export("best", loss)

    def _log_step(self, result: StepResult, seconds: float, progress: TrainProgress) -> None:
        assert self.metrics is not None
        lr, step = self._lr(), self.state.step
        progress.update(step, self.state.epoch, result.loss, lr, result.tokens, seconds)
        if step % self.config.train.log_every != 0:
            return
        seen, skipped = self._skip_totals()
        self.metrics.write(
            step,
            {
                "train/loss": result.loss,
                "train/lr": lr,
                "train/tokens_per_s": result.tokens / max(seconds, 1e-9),
                "train/nonfinite_skipped_batches": self.guard.skipped_batches,
                "data/skipped": skipped,
            },
        )
        limit = self.config.data.max_failure_fraction
        if seen >= 100 and skipped / seen > limit:
            raise DataError(
                f"{skipped} of {seen} samples failed ({self._skip_summary()}) — over "
                f"data.max_failure_fraction={limit}; fix the data (`dsvl prepare-data` reports "
                "bad images) or raise the limit"
            )

    def _skip_totals(self) -> tuple[int, int]:
        """(samples seen, samples skipped) summed over ranks; every rank must call it."""
        counts = torch.tensor([self.skips.seen, self.skips.total], dtype=torch.float64)
        counts = dist.all_reduce_sum(counts.to(self.device))
        return int(counts[0]), int(counts[1])

    def _skip_summary(self) -> str:
        """Skipped samples of every rank by reason (collective: every rank calls it)."""
        merged = SkipCounter()
        for state in dist.gather_objects(self.skips.state_dict()):
            part = SkipCounter()
            part.load_state_dict(state)
            merged.by_reason.update(part.by_reason)
            for reason, ids in part.examples.items():
                merged.examples.setdefault(reason, []).extend(ids[:3])
        return merged.summary()

    def _export(self, name: str, eval_loss: float | None) -> None:
        meta = {"step": self.state.step, "epoch": self._epochs_completed(), "eval_loss": eval_loss}
        model = self.engine.module
        path = export_model(model, self.built, self.config, self.output_dir / name, meta)
        if path is not None:
            log.info("exported %s", path)

    def _epochs_completed(self) -> int:
        """Whole epochs trained so far: `epoch` in every export's meta.json (epoch-K/ says K)."""
        return self.state.epoch + (1 if self._epoch_done() else 0)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fit(config: Config) -> FitResult:
    """Train a run from a validated config (see `Trainer`)."""
    return Trainer(config).fit()
