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


def _cuda_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_processes(gpus: int | None, cpu_procs: int | None, hostfile: Path | None) -> int | None:
    """Processes per node for the launcher, checked against this machine's CUDA GPUs.

    `--gpus N` needs N visible CUDA GPUs here (with a hostfile they are on the listed nodes and
    this is not checked); several CPU processes need the explicit `--cpu-procs N`.
    """
    if gpus is not None and gpus < 1:
        raise ConfigError(f"--gpus {gpus}: give at least 1")
    if cpu_procs is not None:
        if gpus is not None or hostfile is not None:
            raise ConfigError("--cpu-procs trains on this machine's CPUs: drop --gpus/--hostfile")
        if cpu_procs < 1:
            raise ConfigError(f"--cpu-procs {cpu_procs}: give at least 1")
        if _cuda_gpus() > 0:
            raise ConfigError("--cpu-procs: this machine has a CUDA GPU; use --gpus N instead")
        return cpu_procs
    if gpus is None or hostfile is not None:
        return gpus
    visible = _cuda_gpus()
    if visible == 0:
        raise ConfigError(
            f"--gpus {gpus}: no CUDA GPU is visible on this machine; drop --gpus to train in one "
            f"CPU process, or pass --cpu-procs {gpus} to train {gpus} CPU processes"
        )
    if gpus > visible:
        raise ConfigError(
            f"--gpus {gpus}: this machine shows {visible} CUDA GPU(s); use --gpus {visible}"
        )
    return gpus


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
