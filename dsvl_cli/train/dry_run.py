"""`dsvl train --dry-run`: check batch arithmetic and data, estimate memory, load no weights."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from dsvl_cli.config import Config
from dsvl_cli.train.engine import gradient_accumulation_steps
from dsvl_cli.train.memory import estimate_memory


def _hostfile_slots(hostfile: Path) -> int:
    slots = 0
    for line in hostfile.read_text(encoding="utf-8").splitlines():
        for word in line.split("#", 1)[0].split():
            if word.startswith("slots="):
                slots += int(word.removeprefix("slots="))
    return slots


def _data_status(config: Config) -> str:
    """Which prepared files exist (the run itself reads them; here we only look)."""
    root = Path(config.data.prepared_dir)
    missing = [
        name
        for name, spec in config.data.sources.items()
        if not (root / (spec.file or f"{name}.jsonl")).is_file()
    ]
    if not config.data.sources:
        return "no data.sources configured"
    if missing:
        return f"missing prepared files for {', '.join(missing)} under {root} (run prepare-data)"
    return f"{len(config.data.sources)} prepared source file(s) found under {root}"


def dry_run_report(config: Config, gpus: int, hostfile: Path | None, console: Console) -> None:
    """Print batch arithmetic, data status and the per-GPU memory estimate."""
    world = _hostfile_slots(hostfile) if hostfile and hostfile.is_file() else gpus
    accum = gradient_accumulation_steps(config, world)
    train = config.train
    console.print(
        f"batch: {train.micro_batch_size} per GPU x {world} GPU(s) x {accum} accumulation "
        f"= {train.global_batch_size} per optimiser step",
        highlight=False,
    )
    console.print(f"data: {_data_status(config)}", highlight=False)
    console.print(estimate_memory(config, world).table())
