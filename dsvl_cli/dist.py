"""The one owner of torch.distributed: process-group set-up, rank facts, collectives.

`dsvl train` works in one process without a launcher (it fills in the rendezvous variables
itself), under the `deepspeed` launcher, and under `torchrun`.
"""

from __future__ import annotations

import atexit
import os
import socket
from typing import Any

import torch
import torch.distributed as torch_dist

_RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """An unused TCP port on this machine (for single-process rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_env() -> None:
    """Fill the rendezvous variables for a single process started without a launcher."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))
        return
    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """This process's device: its GPU under CUDA, else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def init() -> None:
    """Create the process group through DeepSpeed (nccl on CUDA, gloo on CPU); idempotent."""
    ensure_env()
    import deepspeed

    from dsvl_cli.train.native_ops import skip_shm_comm_op

    # DeepSpeed keeps its own backend object beside torch's process group: both must exist.
    if deepspeed.comm.is_initialized() and torch_dist.is_initialized():
        return
    with skip_shm_comm_op():  # training never uses that op; building it costs minutes and g++
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    # The group lives as long as the process (DeepSpeed <0.19 caches group handles that a
    # re-created group would not match), and ends before the interpreter's own teardown.
    atexit.register(shutdown)


def shutdown() -> None:
    """Destroy the process group (a no-op when none exists); registered by `init` to run at exit.

    Exiting with a live gloo/nccl group leaves the backend's threads to static destructors, which
    can abort a rank (SIGABRT, "terminate called without an active exception") after a run that
    succeeded, so a launcher reports a failure.
    """
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return
    import deepspeed

    if deepspeed.comm.is_initialized():
        deepspeed.comm.destroy_process_group()  # DeepSpeed >=0.19 also drops its cached groups
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (a no-op in one process) and return it."""
    if torch_dist.is_available() and torch_dist.is_initialized() and world_size() > 1:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if torch_dist.is_available() and torch_dist.is_initialized() and world_size() > 1:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return tensor


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order; `[obj]` in one process."""
    if torch_dist.is_available() and torch_dist.is_initialized() and world_size() > 1:
        out: list[Any] = [None] * world_size()
        torch_dist.all_gather_object(out, obj)
        return out
    return [obj]
