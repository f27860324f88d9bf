"""`dsvl train --gpus N [--hostfile F]`: re-launch the same command through the deepspeed launcher.

The children run `python -m dsvl_cli train RECIPE OVERRIDES...` without these flags; the
launcher sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for each of them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from dsvl_cli.errors import ConfigError
from dsvl_cli.log import get_logger

log = get_logger(__name__)


def launcher_command(
    recipe: Path,
    overrides: list[str],
    gpus: int | None,
    hostfile: Path | None,
    master_addr: str | None,
    master_port: int | None,
) -> list[str]:
    """The deepspeed launcher command line for this training run."""
    if gpus is not None and gpus < 1:
        raise ConfigError(f"--gpus {gpus}: give at least 1")
    if hostfile is not None and not hostfile.is_file():
        raise ConfigError(f"--hostfile {hostfile} not found; lines look like 'node1 slots=8'")
    exe = shutil.which("deepspeed")
    cmd = [exe] if exe else [sys.executable, "-m", "deepspeed.launcher.runner"]
    if hostfile is not None:
        cmd += ["--hostfile", str(hostfile)]
    if gpus is not None:
        cmd += ["--num_gpus", str(gpus)]
    if master_addr:
        cmd += ["--master_addr", master_addr]
    if master_port:
        cmd += ["--master_port", str(master_port)]
    return [*cmd, "--no_local_rank", "--module", "dsvl_cli", "train", str(recipe), *overrides]


def launch(
    recipe: Path,
    overrides: list[str],
    gpus: int | None,
    hostfile: Path | None,
    master_addr: str | None,
    master_port: int | None,
) -> int:
    """Run the launcher and return its exit code."""
    cmd = launcher_command(recipe, overrides, gpus, hostfile, master_addr, master_port)
    log.info("launching: %s", " ".join(cmd))
    return subprocess.call(cmd)
