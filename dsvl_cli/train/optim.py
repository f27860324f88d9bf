"""AdamW parameter groups, the optimizer, the LR schedule and the optimizer-step count.

Four groups (as the original DSVL), chosen by module type and parameter role rather than by name
substrings (the original matched `bias` / `LayerNorm.weight` / `embed` in names, which put its
projector LayerNorm, named `projection.1.weight`, under weight decay):

| group                 | parameters                                  | decay | lr            |
|-----------------------|---------------------------------------------|-------|---------------|
| `decay`               | other trainable matrices (projector, LoRA)  | yes   | lr            |
| `no_decay`            | biases, norm weights, every 1-D parameter   | 0     | lr            |
| `pretrained_decay`    | nn.Embedding tables, `token_embed.new_rows` | yes   | lr_pretrained |
| `pretrained_no_decay` | 1-D parameters of embedding modules         | 0     | lr_pretrained |

("yes" = `optim.weight_decay`.)
"Pretrained" means embedding tables only, as in the original (its small lr applied to names with
`embed`): the LM's input table when `trainable.embeddings: full` (whatever the LM's mode), the
new-token rows, and position-embedding tables of a vision tower trained `full`. Other weights of
an LM or vision tower trained `full` use `lr`, like the projector; set `optim.lr` for them.
Empty groups are dropped. Under ZeRO-3 the shapes are read from `ds_shape` (partitioned
parameters are empty tensors).

The optimizer is a torch `AdamW` handed to `deepspeed.initialize`, so DeepSpeed does not JIT-build
FusedAdam; with `distributed.offload_optimizer` it is DeepSpeed's `DeepSpeedCPUAdam` (the step
then runs on the CPU, where it is 5-7x faster than torch's; DeepSpeed refuses other optimizers
under offload).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from rich.table import Table
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from dsvl_cli.config import Config
from dsvl_cli.errors import ConfigError, DataError
from dsvl_cli.log import get_logger
from dsvl_cli.model.trainable import adapted_modules
from dsvl_cli.model.vlm import NewTokenEmbedding

log = get_logger(__name__)

GROUP_NAMES = ("decay", "no_decay", "pretrained_decay", "pretrained_no_decay")
PARTS = ("vision", "mm_projector", "language_model", "token_embed")
# torch's norm layers; HF RMSNorms (LlamaRMSNorm, Qwen2RMSNorm, ...) are caught by class name.
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*
)


def is_norm(module: nn.Module) -> bool:
    """True for normalisation layers: torch's, and any class named *RMSNorm or *LayerNorm."""
    name = type(module).__name__
    return isinstance(module, _NORM_TYPES) or name.endswith(("RMSNorm", "LayerNorm"))


def _shape(param: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))


def numel(param: torch.Tensor) -> int:
    """Element count, also for a ZeRO-3 partitioned parameter (whose local tensor is empty)."""
    return int(getattr(param, "ds_numel", param.numel()))


def _roles(model: nn.Module) -> tuple[set[int], set[int]]:
    """Ids of parameters that take no weight decay, and of pretrained embedding parameters."""
    no_decay: set[int] = set()
    pretrained: set[int] = set()
    for module in model.modules():
        own = dict(module.named_parameters(recurse=False))
        if is_norm(module):
            no_decay.update(id(p) for p in own.values())
        if "bias" in own:
            no_decay.add(id(own["bias"]))
        if isinstance(module, nn.Embedding):
            pretrained.update(id(p) for p in own.values())
        if isinstance(module, NewTokenEmbedding):
            pretrained.add(id(module.new_rows))
    return no_decay, pretrained


def param_groups(model: nn.Module, config: Config) -> list[dict[str, Any]]:
    """The non-empty AdamW groups over `model`'s trainable parameters (see the module doc).

    Each group has `name`, `params`, `lr` and `weight_decay`; every trainable parameter is in
    exactly one group (tied parameters once), frozen ones in none.
    """
    optim = config.optim
    lr_pretrained = optim.lr_pretrained if optim.lr_pretrained is not None else optim.lr
    no_decay, pretrained = _roles(model)
    groups = {
        "decay": (optim.weight_decay, optim.lr),
        "no_decay": (0.0, optim.lr),
        "pretrained_decay": (optim.weight_decay, lr_pretrained),
        "pretrained_no_decay": (0.0, lr_pretrained),
    }
    members: dict[str, list[nn.Parameter]] = {name: [] for name in GROUP_NAMES}
    for param in model.parameters():  # deduplicates tied parameters
        if not param.requires_grad:
            continue
        plain = id(param) in no_decay or len(_shape(param)) < 2
        prefix = "pretrained_" if id(param) in pretrained else ""
        members[prefix + ("no_decay" if plain else "decay")].append(param)
    return [
        {"name": name, "params": members[name], "weight_decay": wd, "lr": lr}
        for name, (wd, lr) in groups.items()
        if members[name]
    ]


def build_optimizer(
    model: nn.Module, config: Config, device: torch.device | None = None
) -> Optimizer:
    """AdamW over `param_groups` (DeepSpeedCPUAdam when the optimizer is offloaded to the CPU).

    On a CPU `device` torch's fused AdamW kernel is used: torch's CPU default is a Python loop
    over parameters, 3-5x slower per step for a model of many small tensors (the CPU demo). On
    CUDA torch's own default (the multi-tensor path) is kept. A resumed run keeps the choice
    stored in its checkpoint (DeepSpeed restores the optimizer's groups); both give the same
    updates.
    """
    groups = param_groups(model, config)
    if not groups:
        raise ConfigError(
            "no parameter is trainable; enable at least one of trainable.projector, "
            "trainable.embeddings, or a LoRA/full language model or vision encoder"
        )
    optim = config.optim
    kwargs: dict[str, Any] = {"lr": optim.lr, "betas": tuple(optim.betas), "eps": optim.eps}
    if config.distributed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    if device is not None and device.type == "cpu":
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def warmup_steps(config: Config, total_steps: int) -> int:
    """`optim.warmup_steps`, or round(warmup_ratio x total_steps), or 0 when neither is set."""
    optim = config.optim
    if optim.warmup_steps is not None:
        return optim.warmup_steps
    if optim.warmup_ratio is not None:
        return round(optim.warmup_ratio * total_steps)
    return 0


def build_scheduler(optimizer: Optimizer, config: Config, total_steps: int) -> LRScheduler:
    """The HF schedule `optim.schedule` with linear warmup, stepped once per optimizer step."""
    from transformers import get_scheduler

    warmup = warmup_steps(config, total_steps)
    if warmup > total_steps:
        log.warning("warmup (%d steps) is longer than training (%d steps)", warmup, total_steps)
    if warmup and config.optim.schedule == "constant":
        log.warning("optim.schedule 'constant' ignores warmup; use 'constant_with_warmup'")
    return get_scheduler(
        config.optim.schedule,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=total_steps,
    )


def total_steps(batches_per_epoch: int, grad_accum: int, epochs: int, max_steps: int | None) -> int:
    """Optimizer steps of a run: epochs x ceil(batches_per_epoch / grad_accum), capped by max_steps.

    `batches_per_epoch` counts this rank's micro-batches (the DataLoader's length). The count
    rounds each epoch's last partial accumulation window up, as the original.
    """
    if batches_per_epoch < 1:
        raise DataError(
            "the training set gives no batch on this rank; add samples or lower "
            "train.micro_batch_size / the number of GPUs"
        )
    if grad_accum < 1 or epochs < 1:
        raise ValueError(f"grad_accum and epochs must be >= 1, got {grad_accum} and {epochs}")
    steps = epochs * math.ceil(batches_per_epoch / grad_accum)
    return steps if max_steps is None else min(max_steps, steps)


def _part_counts(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """Per top-level part: (trainable tensors, trainable params, total params)."""
    counts: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        row = counts.setdefault(name.split(".", 1)[0], [0, 0, 0])
        row[2] += numel(param)
        if param.requires_grad:
            row[0] += 1
            row[1] += numel(param)
    order = [p for p in PARTS if p in counts] + sorted(set(counts) - set(PARTS))
    return {part: (counts[part][0], counts[part][1], counts[part][2]) for part in order}


def trainable_table(model: nn.Module, groups: Iterable[dict[str, Any]]) -> Table:
    """A rich table: each optimizer group, then trainable vs total parameters per model part."""
    table = Table(title="trainable parameters", title_justify="left")
    for column in ("group / part", "tensors", "trainable", "total", "lr", "weight decay"):
        table.add_column(column, justify="left" if column == "group / part" else "right")
    for index, group in enumerate(groups):
        count = sum(numel(p) for p in group["params"])
        name, lr, wd = group.get("name", f"group {index}"), group["lr"], group["weight_decay"]
        table.add_row(name, str(len(group["params"])), f"{count:,}", "", f"{lr:g}", f"{wd:g}")
    table.add_section()
    all_trainable = all_total = 0
    for part, (tensors, trainable, total) in _part_counts(model).items():
        table.add_row(part, str(tensors), f"{trainable:,}", f"{total:,}", "", "")
        all_trainable, all_total = all_trainable + trainable, all_total + total
    share = 100.0 * all_trainable / all_total if all_total else 0.0
    table.add_row("all", "", f"{all_trainable:,}", f"{all_total:,} ({share:.2f}% trained)", "", "")
    _lora_rows(table, model)
    return table


def _lora_rows(table: Table, model: nn.Module) -> None:
    """One row per part with LoRA adapters: which modules got them (and how many of each)."""
    for part, child in model.named_children():
        adapted = adapted_modules(child)
        if adapted:
            listed = ", ".join(f"{name} x{count}" for name, count in sorted(adapted.items()))
            table.add_row(f"LoRA in {part}", str(sum(adapted.values())), listed, "", "", "")
