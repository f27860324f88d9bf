"""The GPU check's training part: recipe, commands, and the numbers read back from a run.

One real `dsvl train` per ZeRO stage on the synthetic task (`dsvl prepare-data synthetic`) with
random-weight base models (`check_models`): vision frozen, LM and embeddings trained in full,
projector trained, MMCA on (the FlexAttention kernels on CUDA), `train.max_steps` steps, every
step logged. What is read back, and from where:

* tokens/s: the median of the run's own per-step `train/tokens_per_s` (metrics.jsonl; tokens =
  non-pad input tokens of the optimiser step, image tokens included; seconds = wall time of the
  step, which ends in a host sync), over the steps after the first `skip_steps` (FlexAttention
  compiles and the allocator warms up there).
* LM MFU (GPU only): 6 x LM parameters x tokens/s / peak bf16 FLOP/s; the frozen vision tower's
  forward and attention FLOPs are not counted, so it understates the work done.
* peak memory: torch's allocator peaks, written by `cuda_peak` when the run exits.
* loop seconds: metrics.jsonl time of the last step minus that of the first (steps 2..N: after
  the first compile, including any recompile for a new sequence length).
* loss fell: the run's last eval loss is below its step-0 eval loss (same eval set).
* reload: `export_probe` on output_dir/final: finite logits, and its eval loss against the run's.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dsvl_cli.bench.child import python_command

PEAK_BF16_TFLOPS = 989.0  # H100 / H200 SXM dense bf16 (as dsvl_cli.bench.mmca)
EVAL_FRACTION = 0.1  # generate_synthetic's default hold-out share
RELOAD_TOLERANCE = 0.02  # relative |reloaded - run| eval loss allowed (bf16 kernels differ)


@dataclass(frozen=True)
class TrainSettings:
    """How the training part runs: model size, steps, batch, precision, ZeRO stages."""

    size: str
    steps: int
    micro_batch: int
    eval_batch: int
    precision: str
    stages: tuple[int, ...]
    lr: float
    max_seq_len: int
    workers: int
    skip_steps: int
    overrides: tuple[str, ...] = ()


GPU_SETTINGS = TrainSettings("1b", 30, 16, 16, "bf16", (2, 3), 3e-4, 1024, 2, 5)
SMOKE_SETTINGS = TrainSettings("tiny", 3, 2, 4, "fp32", (2,), 2e-3, 512, 0, 1)


def synthetic_count(settings: TrainSettings) -> int:
    """Conversations to generate: enough training samples for every step, plus an eval split."""
    train = settings.steps * settings.micro_batch
    return math.ceil(train / (1 - EVAL_FRACTION) * 1.1) + 8


def prepare_command(data_dir: Path, num: int) -> list[str]:
    """`dsvl prepare-data synthetic`: images, train/eval JSONL, tokenizer (+ tiny models)."""
    return python_command(
        "-m", "dsvl_cli", "prepare-data", "synthetic", "--out", str(data_dir), "--num", str(num)
    )


def models_command(data_dir: Path, models_dir: Path, size: str, facts: Path) -> list[str]:
    return python_command(
        "-m",
        "dsvl_cli.bench.check_models",
        *("--data", str(data_dir), "--out", str(models_dir)),
        *("--size", size, "--json", str(facts)),
    )


def write_recipe(path: Path, data_dir: Path, models_dir: Path, settings: TrainSettings) -> None:
    """The check's recipe; the stage, precision, steps and output folder come as overrides."""
    recipe = {
        "model": {
            "language_model": str(models_dir / "lm"),
            "vision": {"kind": "clip", "path": str(models_dir / "vision")},
            "projector": "linear",
            "mmca": True,
            "max_seq_len": settings.max_seq_len,
            "max_images_per_sample": 4,
        },
        "trainable": {"vision": "frozen", "language_model": "full", "embeddings": "full"},
        "data": {
            "prepared_dir": str(data_dir),
            "sources": {"synthetic": {"file": "train.jsonl"}},
            "eval_file": "eval.jsonl",
            "seed": 0,
            "workers": settings.workers,
        },
        "optim": {
            "lr": settings.lr,
            "weight_decay": 0.0,
            "warmup_steps": max(1, settings.steps // 10),  # a random 1B LM spikes at full lr
        },
        "train": {
            "epochs": 1,
            "micro_batch_size": settings.micro_batch,
            "global_batch_size": settings.micro_batch,
            "eval_batch_size": settings.eval_batch,
            "log_every": 1,
            "save_every": None,  # a ZeRO checkpoint of 1B trained parameters is ~16 GB of disk
            "seed": 0,
            "tensorboard": False,
            "overwrite": True,
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")


def train_command(
    recipe: Path, run_dir: Path, stage: int, settings: TrainSettings, peak_file: Path
) -> list[str]:
    """`dsvl train RECIPE overrides...` through `cuda_peak` (same CLI, plus the memory peak).

    `settings.overrides` (the check's --train-override) come last, so they win.
    """
    overrides = [
        f"distributed.zero_stage={stage}",
        f"distributed.precision={settings.precision}",
        f"train.max_steps={settings.steps}",
        f"train.output_dir={run_dir}",
        *settings.overrides,
    ]
    return python_command(
        "-m", "dsvl_cli.bench.cuda_peak", str(peak_file), "train", str(recipe), *overrides
    )


def probe_command(final: Path, eval_jsonl: Path, batch: int, facts: Path) -> list[str]:
    return python_command(
        "-m",
        "dsvl_cli.bench.export_probe",
        str(final),
        *("--eval-jsonl", str(eval_jsonl), "--batch-size", str(batch), "--json", str(facts)),
    )


def read_json(path: Path) -> dict[str, Any] | None:
    """The file's JSON object, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl ([] when there is none); bad lines are skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def train_numbers(
    records: list[dict[str, Any]],
    peak: dict[str, Any] | None,
    lm_params: int | None,
    skip_steps: int,
) -> dict[str, Any]:
    """Tokens/s, loss trajectory, peak memory and LM MFU of a run (see the module docstring)."""
    train = [r for r in records if "train/loss" in r]
    evals = [r["eval/loss"] for r in records if "eval/loss" in r]
    steady = [r["train/tokens_per_s"] for r in train if r["step"] > skip_steps]
    rate = statistics.median(steady) if steady else None
    numbers: dict[str, Any] = {
        "steps": max((r["step"] for r in train), default=0),
        "loop_s": train[-1]["time"] - train[0]["time"] if len(train) > 1 else None,
        "tokens_per_s": rate,
        "tokens_per_s_steps": len(steady),
        "train_loss_first": train[0]["train/loss"] if train else None,
        "train_loss_last": train[-1]["train/loss"] if train else None,
        "eval_loss_first": evals[0] if evals else None,
        "eval_loss_last": evals[-1] if evals else None,
        "loss_fell": len(evals) >= 2 and evals[-1] < evals[0],
    }
    if peak and peak.get("cuda"):
        numbers["peak_allocated_gib"] = peak["max_allocated_gib"]
        numbers["peak_reserved_gib"] = peak["max_reserved_gib"]
        if rate is not None and lm_params:
            numbers["lm_mfu"] = 6 * lm_params * rate / (PEAK_BF16_TFLOPS * 1e12)
    return numbers


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def count(n: int) -> str:
    """1008230400 -> "1.008B", 130368 -> "130.4K"."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.{3 if unit == 'B' else 1}f}{unit}"
    return str(n)


def train_summary(n: dict[str, Any]) -> str:
    """One line of a run's key numbers."""
    parts = [f"{_num(n['tokens_per_s'], ',.0f')} tok/s (median of {n['tokens_per_s_steps']})"]
    if "peak_allocated_gib" in n:
        peak = f"peak {n['peak_allocated_gib']:.1f} GiB alloc / {n['peak_reserved_gib']:.1f} resv"
        parts.append(peak)
    else:
        parts.append("peak GPU mem n/a (no CUDA)")
    if "lm_mfu" in n:
        parts.append(f"LM MFU {100 * n['lm_mfu']:.1f}%")
    parts.append(
        f"train loss {_num(n['train_loss_first'], '.3f')}->{_num(n['train_loss_last'], '.3f')}, "
        f"eval {_num(n['eval_loss_first'], '.3f')}->{_num(n['eval_loss_last'], '.3f')} "
        f"({'fell' if n['loss_fell'] else 'did NOT fall'})"
    )
    parts.append(f"{n['steps']} steps, steps 2-{n['steps']} in {_num(n['loop_s'], '.1f')} s")
    return "; ".join(parts)


def reload_numbers(facts: dict[str, Any], run_eval_loss: float | None) -> dict[str, Any]:
    """The probe's facts plus whether its eval loss matches the run's last one."""
    numbers = dict(facts)
    loss = facts.get("eval_loss")
    if loss is not None and run_eval_loss is not None:
        gap = abs(loss - run_eval_loss)
        numbers["run_eval_loss"] = run_eval_loss
        numbers["loss_matches"] = gap <= RELOAD_TOLERANCE * max(1.0, abs(run_eval_loss))
    return numbers


def reload_summary(n: dict[str, Any]) -> str:
    logits = "finite" if n.get("logits_finite") else "NOT finite"
    line = f"logits {n.get('logits_shape')} {logits}; eval loss {_num(n.get('eval_loss'), '.4f')}"
    if "run_eval_loss" in n:
        verdict = "matches" if n["loss_matches"] else "DIFFERS from"
        line += f" {verdict} the run's {n['run_eval_loss']:.4f}"
    return f"{line}; load {n.get('load_s')} s on {n.get('device')} {n.get('dtype')}"
