"""Reading checkpoint files without running code they might carry: `torch.load(weights_only=True)`.

A `.pt` file is a pickle; loaded with `weights_only=False` (what DeepSpeed's checkpoint engine
passes) a crafted `checkpoints/step-N/state/*.pt` runs arbitrary code on resume. Every checkpoint
file is read by `safe_load`: torch's restricted unpickler (tensors, containers, numbers, strings)
plus exactly the DeepSpeed types its ZeRO 0-3 checkpoints hold, fp32, bf16 and fp16, with or
without offload (found by saving real checkpoints and listing what they reference, see
tests/test_safe_load.py):

    deepspeed.runtime.fp16.loss_scaler.LossScaler         ZeRO 1-3 optimizer states
    deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler  ZeRO 1-3 with fp16
    deepspeed.runtime.zero.config.ZeroStageEnum           ZeRO 1-3 optimizer states
    deepspeed.utils.tensor_fragment.fragment_address      ZeRO 1-2 optimizer states

Anything else is refused with one line naming the file and the object. DeepSpeed reads its files
inside `engine.load_checkpoint`, so `deepspeed_reads_safely` swaps `torch.load` for `safe_load`
for the length of that call (DeepSpeed 0.18-0.19 call `torch.load` from their checkpoint engine;
the swap also covers any other read it makes).
"""

from __future__ import annotations

import contextlib
import importlib
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dsvl_cli.errors import CheckpointError
from dsvl_cli.log import get_logger

log = get_logger(__name__)

DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
REFUSED_FIX = (
    "refusing to load it (unpickling it could run code it carries); resume from a checkpoint "
    "dsvl wrote, or set train.resume=never"
)
DAMAGED_FIX = (
    "resume from another checkpoints/step-N (train.resume=auto takes the newest complete one), "
    "or set train.resume=never"
)
_GLOBAL = re.compile(r"GLOBAL (\S+)")
_DETAIL = re.compile(r"WeightsUnpickler error:\s*([^\n]+)")


def allowed_globals() -> list[Any]:
    """The DeepSpeed classes checkpoints may hold (names this DeepSpeed lacks are left out)."""
    found = []
    for dotted in DEEPSPEED_GLOBALS:
        module, _, name = dotted.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            log.debug("%s not in this DeepSpeed; not allow-listed", dotted)
    return found


def _refused_object(path: Path, err: Exception) -> str:
    """The global a weights-only load stopped at, as torch names it."""
    if match := _GLOBAL.search(str(err)):
        return match.group(1).rstrip(".,")
    with contextlib.suppress(RuntimeError, OSError, ValueError):  # only names the object
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if names := [g for g in unsafe if g not in DEEPSPEED_GLOBALS]:
            return names[0]
    detail = _DETAIL.search(str(err))
    return f"({detail.group(1).strip()})" if detail else "(unknown)"


def safe_load(path: str | Path, map_location: Any = None) -> Any:
    """`torch.load(path, weights_only=True)` with DeepSpeed's checkpoint types allowed.

    Raises CheckpointError (one line naming the file) for a file holding any other object, and
    for a missing, truncated or damaged file.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return _ORIGINAL_LOAD(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = _refused_object(path, err)
        raise CheckpointError(
            f"{path}: not a dsvl/DeepSpeed checkpoint (unsupported object {found}); {REFUSED_FIX}"
        ) from None
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; {DAMAGED_FIX}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is damaged or truncated ({_first_sentence(err)}); {DAMAGED_FIX}"
        ) from None


def _first_sentence(err: Exception) -> str:
    """The start of an error's text, for a one-line message (torch appends paragraphs)."""
    text = " ".join(str(err).split())
    return text.split(". ")[0].rstrip(".") or type(err).__name__


def _load_for_deepspeed(f: str | Path, map_location: Any = None, **_ignored: Any) -> Any:
    """Stands in for `torch.load` while DeepSpeed reads a checkpoint (its `weights_only=False`
    among the ignored arguments)."""
    return safe_load(f, map_location)


# Kept so `safe_load` reaches the real function while `torch.load` is swapped.
_ORIGINAL_LOAD = torch.load


@contextlib.contextmanager
def deepspeed_reads_safely() -> Iterator[None]:
    """Within the block, every `torch.load` (DeepSpeed's included) is `safe_load`.

    Meant for one call, `engine.load_checkpoint`, at resume before any other thread runs.
    """
    saved = torch.load
    torch.load = _load_for_deepspeed  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = saved  # type: ignore[assignment]
