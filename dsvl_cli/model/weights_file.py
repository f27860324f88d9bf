"""Reading a user's vision weights file, where every way it can be wrong is one line.

`read_weights` opens `.safetensors` with safetensors and anything else with
`torch.load(weights_only=True)`; a folder, an empty file, a truncated or garbage file, or a
pickle that is not a tensor dict becomes a `CheckpointError` naming the file, what was found and
what was expected. `open_clip_visual` then picks the image tower's tensors out of an open_clip
checkpoint (full CLIP, image tower only, or a training checkpoint with `state_dict` and
`module.` prefixes) and recognises Hugging Face CLIP weights (`kind: clip`).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dsvl_cli.errors import CheckpointError

# What a file that is not a readable tensor dict raises in safetensors / torch.load (zip or
# legacy pickle): garbage bytes end in IndexError or UnpicklingError, a cut zip in RuntimeError.
READ_ERRORS = (
    OSError,
    RuntimeError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    pickle.UnpicklingError,
    SafetensorError,
)
# Key names only Hugging Face CLIP checkpoints have (full CLIPModel, or a CLIPVisionModel saved
# with its prefix stripped).
_HF_CLIP_MARKS = ("vision_model.", "text_model.", "embeddings.patch_embedding", "encoder.layers.")
_EXAMPLES = 3


_SHORT = 100  # characters of a library's error message quoted in ours


def first_line(err: BaseException) -> str:
    """`Type: first line of the message`, cut to a readable length."""
    if isinstance(err, pickle.UnpicklingError):
        # torch's weights-only refusal is a paragraph about trusting the file: the fact is
        # that it is no tensor-only torch file
        return "UnpicklingError: not a tensor-only torch file"
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    line = line if len(line) <= _SHORT else line[: _SHORT - 3] + "..."
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def read_weights(path: Path, expected: str) -> dict[str, torch.Tensor]:
    """The tensors in the weights file `path`; `expected` says what it should be (messages).

    Raises:
        CheckpointError: missing, a folder, empty, unreadable, or not a dict of tensors.
    """
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, but the vision path must be {expected}")
    if not path.is_file():
        raise CheckpointError(f"{path} not found; the vision path must be {expected}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); expected {expected}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except READ_ERRORS as err:
        raise CheckpointError(
            f"{path} ({size:,} bytes) is not a readable weights file ({first_line(err)}); "
            f"expected {expected}: is it complete (re-download it)?"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # an open_clip training checkpoint
    if not isinstance(state, dict) or not state:
        found = type(state).__name__ if not isinstance(state, dict) else "an empty dict"
        raise CheckpointError(f"{path} holds {found}, not a dict of tensors; expected {expected}")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors; expected {expected}")
    return tensors


def open_clip_visual(
    state: dict[str, torch.Tensor], path: Path, name: str
) -> dict[str, torch.Tensor]:
    """The `visual.*` tensors of an open_clip checkpoint, keys without the prefix.

    Raises:
        CheckpointError: Hugging Face CLIP weights (use kind clip), or no image-tower tensor.
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    keys = sorted(state)
    if any(mark in k for k in keys for mark in _HF_CLIP_MARKS):
        raise CheckpointError(
            f"{path} holds Hugging Face CLIP weights (e.g. {keys[0]}), not open_clip ones; "
            "set model.vision.kind=clip and model.vision.path to the folder with its config.json"
        )
    visual = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    if not visual:
        raise CheckpointError(
            f"{path} does not load into open_clip {name}: it has no visual.* tensor (found "
            f"{len(keys)} tensors, e.g. {', '.join(keys[:_EXAMPLES])}); expected an open_clip "
            "CLIP checkpoint such as open_clip_pytorch_model.bin"
        )
    return visual


def key_diff(
    model: torch.nn.Module, state: dict[str, torch.Tensor], shape_format: str
) -> tuple[list[str], list[str], list[str]]:
    """Sorted (missing, unexpected, mis-shaped) keys of `state` against `model`'s tensors.

    `shape_format` words a mis-shaped key, with fields `key`, `found` and `expected` (shapes).
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes = sorted(
        shape_format.format(key=k, found=tuple(state[k].shape), expected=expected[k])
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != expected[k]
    )
    return sorted(set(expected) - set(state)), sorted(set(state) - set(expected)), shapes


def mismatch_line(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """One phrase on how `state` differs from `model`'s tensors (missing, unexpected, shapes)."""
    missing, unexpected, shapes = key_diff(
        model, state, "{key} {found} where {expected} was expected"
    )
    parts = [
        f"{len(keys)} {label} (e.g. {', '.join(keys[:_EXAMPLES])})"
        for label, keys in (
            ("shapes differ", shapes),
            ("missing", missing),
            ("unexpected", unexpected),
        )
        if keys
    ]
    return "; ".join(parts) or None
