"""The DeepSpeed config dict, built from the typed Config (a pure function: no deepspeed import).

`deepspeed_config(config, world_size)` is the one place that writes DeepSpeed keys.
It follows the original's `get_train_ds_config` with three differences:

* offload of optimizer states (ZeRO 1-3) and parameters (ZeRO 3) can be switched on;
* `stage3_prefetch_bucket_size` is DeepSpeed's default 5e7 instead of the original's 0, which
  disabled prefetching and serialised every ZeRO-3 all-gather with compute;
* no optimizer or scheduler section: the trainer passes a torch optimizer and an HF scheduler
  (`optim.py`), so DeepSpeed never JIT-builds FusedAdam (a 60 s C++ build on CPU).

`distributed.deepspeed` (any DeepSpeed key) is deep-merged last, so users can set what the schema
does not cover; the keys dsvl derives itself (batch sizes, optimizer, scheduler) are refused there
with a message naming the dsvl field to set instead.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from dsvl_cli.config import Config
from dsvl_cli.errors import ConfigError

# The original's ZeRO-3 knobs: keep small parameters (<1e4 elements: norms,
# biases) gathered on every rank and bound the gathered working set to 3e7 parameters.
STAGE3_PARAM_PERSISTENCE_THRESHOLD = 10_000
STAGE3_MAX_LIVE_PARAMETERS = 30_000_000
# DeepSpeed's default; the original's 0 turned prefetching off (each layer waited for its
# all-gather). 5e7 elements is about two LLaMA-7B decoder layers in flight.
STAGE3_PREFETCH_BUCKET_SIZE = 50_000_000
# fp16 dynamic loss scaling as the original (window 100) with DeepSpeed's usual other values.
FP16_SECTION: dict[str, Any] = {
    "enabled": True,
    "loss_scale": 0,  # 0 = dynamic
    "loss_scale_window": 100,
    "initial_scale_power": 16,
    "hysteresis": 2,
    "min_loss_scale": 1,
}
# dsvl logs loss, lr and throughput itself (metrics.py); DeepSpeed's own prints would duplicate.
STEPS_PER_PRINT = 1_000_000_000
# Keys dsvl derives from its own fields; setting them in distributed.deepspeed would desync the
# trainer (batch accounting) or clash with the client optimizer/scheduler it passes.
_RESERVED = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size (accumulation is derived)",
    "optimizer": "optim.* (dsvl passes a torch AdamW to DeepSpeed)",
    "scheduler": "optim.schedule / optim.warmup_* (dsvl passes an HF scheduler)",
}


def gradient_accumulation_steps(config: Config, world_size: int) -> int:
    """global_batch_size / (micro_batch_size x world_size), or ConfigError if not a whole >= 1."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    micro, total = config.train.micro_batch_size, config.train.global_batch_size
    unit = micro * world_size
    if total % unit == 0:
        return total // unit
    lower, upper = (total // unit) * unit, (total // unit + 1) * unit
    valid = " or ".join(str(v) for v in (lower, upper) if v > 0)
    gpus = "GPU" if world_size == 1 else "GPUs"
    raise ConfigError(
        f"train.global_batch_size={total} is not a multiple of micro_batch_size {micro} x "
        f"{world_size} {gpus} = {unit}; use {valid} (or change train.micro_batch_size)"
    )


def check_epoch_fits_a_step(config: Config, world_size: int, batches_per_epoch: int) -> None:
    """ConfigError when one epoch gives each process fewer micro-batches than one step needs.

    `batches_per_epoch` is one process's micro-batches per epoch (its DataLoader's length).
    """
    micro, total = config.train.micro_batch_size, config.train.global_batch_size
    accumulation = gradient_accumulation_steps(config, world_size)
    if batches_per_epoch < 1 or batches_per_epoch >= accumulation:
        return  # no batch at all is a data problem (optim.total_steps says so)
    unit = micro * world_size
    most = batches_per_epoch * unit
    doubling = [unit * 2**k for k in range(most.bit_length()) if unit * 2**k <= most]
    examples = " or ".join(str(v) for v in sorted(doubling, reverse=True)[:2])
    procs = "process" if world_size == 1 else "processes"
    raise ConfigError(
        f"train.global_batch_size={total} needs {accumulation} micro-batches of {micro} per "
        f"process ({world_size} {procs}) for one step, but an epoch of the training split gives "
        f"{batches_per_epoch} per process; use a multiple of {unit} up to {most}, e.g. "
        f"{examples} (or add training samples)"
    )


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict: `base` updated by `extra`, nested dicts merged recursively, others replaced."""
    merged = copy.deepcopy(dict(base))
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _zero_section(config: Config) -> dict[str, Any]:
    dist = config.distributed
    stage = dist.zero_stage
    if dist.offload_params and stage != 3:
        raise ConfigError(
            f"distributed.offload_params needs distributed.zero_stage=3 (got {stage}); "
            "set zero_stage=3 or offload_params=false"
        )
    if dist.offload_optimizer and stage == 0:
        raise ConfigError(
            "distributed.offload_optimizer needs distributed.zero_stage 1, 2 or 3 (got 0); "
            "set zero_stage=2 or offload_optimizer=false"
        )
    zero: dict[str, Any] = {"stage": stage}
    if dist.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if dist.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        zero.update(
            stage3_param_persistence_threshold=STAGE3_PARAM_PERSISTENCE_THRESHOLD,
            stage3_max_live_parameters=STAGE3_MAX_LIVE_PARAMETERS,
            stage3_prefetch_bucket_size=STAGE3_PREFETCH_BUCKET_SIZE,
            # The original's choice: plain F.linear under zero.Init (PEFT wraps these layers).
            memory_efficient_linear=False,
        )
    return zero


def _precision_section(precision: str) -> dict[str, Any]:
    if precision == "bf16":
        return {"bf16": {"enabled": True}}
    if precision == "fp16":
        return {"fp16": dict(FP16_SECTION)}
    return {}  # fp32: no mixed-precision section


def _check_extra(extra: Mapping[str, Any]) -> None:
    clashes = [f"{key} (set {_RESERVED[key]})" for key in extra if key in _RESERVED]
    if clashes:
        raise ConfigError(
            "distributed.deepspeed may not set keys dsvl derives: " + "; ".join(clashes)
        )


def deepspeed_config(config: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for `config` on `world_size` processes (data-parallel ranks).

    Raises:
        ConfigError: the batch sizes do not divide, offload is asked for a ZeRO stage that does
            not support it, or `distributed.deepspeed` sets a key dsvl derives itself.
    """
    accumulation = gradient_accumulation_steps(config, world_size)
    train, dist = config.train, config.distributed
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "train_batch_size": train.global_batch_size,
        "gradient_accumulation_steps": accumulation,
        "zero_optimization": _zero_section(config),
        **_precision_section(dist.precision),
        "gradient_clipping": float(train.grad_clip) if train.grad_clip is not None else 0.0,
        "prescale_gradients": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }
    _check_extra(dist.deepspeed)
    return deep_merge(ds, dist.deepspeed)
