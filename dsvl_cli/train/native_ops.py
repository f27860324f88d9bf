"""DeepSpeed's JIT-compiled C++ ops: the one training never uses is skipped, the one it needs is
checked before anything slow.

* The shared-memory comm op (`deepspeed_shm_comm`). DeepSpeed's CPU backend compiles it the first
  time a process group is created on a machine (1-2 minutes, needs a C++ compiler; without one the
  run ends in a traceback). It only serves `inference_all_reduce`, the tensor-parallel inference
  collective, which falls back to `torch.distributed.all_reduce` when the op is absent; training
  (gloo collectives through torch.distributed, in one CPU process or several) never calls it.
  `skip_shm_comm_op` makes DeepSpeed's `build_shm_op` answer "unavailable" (its own result when an
  accelerator has no such op) while dsvl creates the process group. This is the one place dsvl
  touches DeepSpeed internals; on a DeepSpeed without that function nothing is patched.
* The CPU Adam op (`cpu_adam`), used by `distributed.offload_optimizer`. It is compiled on first
  use unless DeepSpeed was installed with it prebuilt; `check_cpu_adam` refuses a machine with no
  compiler in one line and says once that the first run spends a minute or two compiling.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
from collections.abc import Iterator
from typing import Any

from dsvl_cli.config import Config
from dsvl_cli.errors import ConfigError
from dsvl_cli.log import get_logger

log = get_logger(__name__)

SHM_MODULE = "deepspeed.comm.torch"
SHM_BUILDER = "build_shm_op"


def _no_shm_op() -> None:
    """Stands in for DeepSpeed's `build_shm_op`: None is its answer for "no such op here"."""
    return None


@contextlib.contextmanager
def skip_shm_comm_op() -> Iterator[None]:
    """While active, creating DeepSpeed's comm backend does not compile the shared-memory op."""
    try:
        module: Any = importlib.import_module(SHM_MODULE)
    except ImportError:
        module = None
    original = getattr(module, SHM_BUILDER, None)
    if not callable(original):
        log.debug("%s.%s not found: nothing to skip", SHM_MODULE, SHM_BUILDER)
        yield
        return
    setattr(module, SHM_BUILDER, _no_shm_op)
    try:
        yield
    finally:
        setattr(module, SHM_BUILDER, original)


def _prebuilt(op: str) -> bool:
    """True when DeepSpeed was installed with `op` compiled ahead of time."""
    try:
        info = importlib.import_module("deepspeed.git_version_info")
    except ImportError:
        return False
    return bool(getattr(info, "installed_ops", {}).get(op, False))


def compiler() -> str | None:
    """The C++ compiler torch's extension builder would call, if it is on PATH."""
    return shutil.which(os.environ.get("CXX", "c++"))


def check_cpu_adam(config: Config) -> None:
    """With distributed.offload_optimizer: ConfigError if the CPU Adam op cannot be compiled."""
    if not config.distributed.offload_optimizer or _prebuilt("cpu_adam"):
        return
    if compiler() is None:
        raise ConfigError(
            "distributed.offload_optimizer=true uses DeepSpeed's CPU Adam op, which is compiled "
            f"on first use, but no C++ compiler ({os.environ.get('CXX', 'c++')}) is on PATH; "
            "install one (e.g. apt-get install g++) or set distributed.offload_optimizer=false"
        )
    log.info(
        "distributed.offload_optimizer: DeepSpeed compiles its CPU Adam op on the first run on "
        "a machine (1-2 minutes; later runs reuse the build)"
    )
