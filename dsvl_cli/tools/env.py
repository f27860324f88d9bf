"""`dsvl env`: the versions and hardware facts a bug report needs."""

from __future__ import annotations

import platform
import sys
from importlib import metadata

from rich.console import Console
from rich.table import Table

from dsvl_cli import __version__

_PACKAGES = (
    "torch",
    "deepspeed",
    "transformers",
    "peft",
    "open_clip_torch",
    "tokenizers",
    "safetensors",
    "pydantic",
    "typer",
)


def _version_of(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _accelerators() -> dict[str, str]:
    import torch

    facts = {
        "torch CUDA build": str(torch.version.cuda),
        "CUDA available": str(torch.cuda.is_available()),
    }
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        facts["GPUs"] = f"{len(names)} x {names[0]}" if len(set(names)) == 1 else ", ".join(names)
        facts["bf16 supported"] = str(torch.cuda.is_bf16_supported())
    else:
        facts["GPUs"] = "none"
    facts["CPU threads"] = str(torch.get_num_threads())
    return facts


def collect_env() -> dict[str, str]:
    """Gather dsvl, Python, platform, package versions and accelerator facts."""
    facts = {
        "dsvl": __version__,
        "Python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    facts.update({name: _version_of(name) for name in _PACKAGES})
    facts.update(_accelerators())
    return facts


def render_env(facts: dict[str, str], console: Console) -> None:
    """Print the facts as a two-column table (copy-pasteable into an issue)."""
    table = Table(show_header=False, box=None)
    for key, value in facts.items():
        table.add_row(key, value)
    console.print(table)
