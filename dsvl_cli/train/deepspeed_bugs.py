"""Known DeepSpeed bugs that corrupt a run silently: refused in one line before anything starts.

* ZeRO-3 on several CPU processes (gloo) before DeepSpeed 0.19.8. ZeRO-3 gathers several
  partitioned parameters at once by launching one asynchronous all-gather per parameter into
  uninitialised buffers and waiting only for the last one. On CUDA the gathers run in order on one
  stream, so that is safe; on gloo every gather runs on its own thread and the CPU accelerator's
  `synchronize()` does nothing, so a layer can read a parameter before its gather has written it.
  What it reads is uninitialised memory: NaN or finite garbage in forward passes, evaluations and
  exports (seen here: NaN eval losses on 1 run in 3 with LoRA on both towers). DeepSpeed 0.19.8
  waits for every gather. ZeRO 0-2 never gather parameters, CUDA runs are not affected, and one
  process has nothing to gather, so only this combination is refused.
"""

from __future__ import annotations

import re
from importlib import metadata

from dsvl_cli.config import Config
from dsvl_cli.errors import ConfigError

GLOO_ZERO3_FIXED_IN = (0, 19, 8)


def _release(version: str) -> tuple[int, int, int]:
    """`0.19.8+abc` / `0.18.0rc1` / `0.20` -> (0, 19, 8) / (0, 18, 0) / (0, 20, 0)."""
    numbers = [int(n) for n in re.findall(r"\d+", version.split("+")[0])[:3]]
    major, minor, patch = (*numbers, 0, 0, 0)[:3]
    return major, minor, patch


def installed_deepspeed() -> str:
    """The installed DeepSpeed version string (from the package metadata, no import)."""
    return metadata.version("deepspeed")


def check_gloo_zero3(
    config: Config, processes: int, cuda: bool, version: str | None = None
) -> None:
    """Refuse ZeRO-3 on several CPU processes with a DeepSpeed that races its gloo all-gathers.

    Args:
        config: the validated run config (`distributed.zero_stage` is read).
        processes: data-parallel processes of the run (world size).
        cuda: whether the run uses CUDA (nccl); only gloo (CPU) runs are affected.
        version: the DeepSpeed version to judge; default the installed one.

    Raises:
        ConfigError: stage 3, more than one process, no CUDA and DeepSpeed < 0.19.8.
    """
    if config.distributed.zero_stage != 3 or processes < 2 or cuda:
        return
    version = version or installed_deepspeed()
    if _release(version) >= GLOO_ZERO3_FIXED_IN:
        return
    fixed = ".".join(map(str, GLOO_ZERO3_FIXED_IN))
    raise ConfigError(
        f"distributed.zero_stage=3 on {processes} CPU processes: DeepSpeed {version} can read "
        f"ZeRO-3 parameters before their gloo all-gather finished (NaN or garbage weights, fixed "
        f"in {fixed}); pip install 'deepspeed>={fixed}', or use distributed.zero_stage=2"
    )
