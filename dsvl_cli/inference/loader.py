"""Loading a dsvl model folder for chat and eval: device, dtype, and an optional device map.

A model folder is an export (`output_dir/final`, `best`, `epoch-K`) or a `dsvl fuse-lora` folder;
`dsvl_cli.model.folder` reads it and rebuilds the model from its saved config (an export's base
models can be pointed elsewhere with `base_lm` / `base_vision`). This module picks
the device and dtype (``"auto"``: the GPU in bf16 when there is one, else the CPU in fp32) and,
for models larger than one GPU, spreads the model over the visible GPUs with accelerate
(``device_map="auto"``, ``"balanced"`` or ``"sequential"``).

Device maps keep the vision encoder, the projector and the token embeddings on one device (the
first one): image features are written into the token embeddings with one `masked_scatter`, which
needs both on the same device. The LM's decoder layers are never split (its `_no_split_modules`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsvl_cli.config import Config
from dsvl_cli.errors import ConfigError
from dsvl_cli.log import get_logger
from dsvl_cli.model.builder import Built
from dsvl_cli.model.vlm import VisualChatModel

log = get_logger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
DEVICE_MAPS = ("auto", "balanced", "sequential")
# Modules that must share the device of the token embeddings (see the module docstring).
PINNED = ("vision", "mm_projector", "token_embed")


@dataclass
class LoadedModel:
    """A model ready for inference.

    Attributes:
        folder: the model folder it came from.
        built: model, tokenizer and image transform (`dsvl_cli.model.builder.Built`).
        config: the folder's resolved config.
        device: where inputs go (the device of the token embeddings).
        dtype: the weights' dtype.
    """

    folder: Path
    built: Built
    config: Config
    device: torch.device
    dtype: torch.dtype

    @property
    def model(self) -> VisualChatModel:
        return self.built.model

    @property
    def max_context(self) -> int:
        """Tokens a conversation may hold: the trained length, capped by the LM's positions."""
        positions = getattr(self.model.config, "max_position_embeddings", None)
        limit = self.config.model.max_seq_len
        return limit if positions is None else min(limit, int(positions))

    @property
    def max_images(self) -> int:
        return self.config.model.max_images_per_sample


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> ``cuda`` when a GPU is visible, else ``cpu``; other names as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"--device {device!r}: {err}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device!r}: no CUDA GPU is visible; use --device cpu")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``"auto"`` -> bf16 on a GPU that supports it, else fp32; or fp32 | bf16 | fp16."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def plan_device_map(
    model: VisualChatModel,
    strategy: str,
    dtype: torch.dtype,
    max_memory: dict[int | str, int | str] | None = None,
) -> dict[str, int | str]:
    """An accelerate device map for `model`; vision, projector and embeddings on one device.

    Args:
        strategy: "auto" or "balanced" (spread evenly over the GPUs) or "sequential" (fill
            GPU 0 first).
        max_memory: per-device budgets (device index or "cpu" -> bytes or "10GiB"); None
            measures the visible devices.
    """
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if strategy not in DEVICE_MAPS:
        raise ConfigError(f"--device-map {strategy!r}: choose one of {', '.join(DEVICE_MAPS)}")
    lm = model.language_model
    no_split = sorted(set(getattr(lm, "_no_split_modules", None) or ()))
    if strategy != "sequential":
        max_memory = get_balanced_memory(
            model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype
        )
    device_map = infer_auto_device_map(
        model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype
    )
    if "disk" in device_map.values():
        raise ConfigError(
            "the model does not fit in GPU and CPU memory together; use more GPUs or a smaller "
            "--dtype (disk offload is not supported)"
        )
    return _pin_to_embeddings(model, device_map)


def _pin_to_embeddings(
    model: VisualChatModel, device_map: dict[str, int | str]
) -> dict[str, int | str]:
    """Put every `PINNED` module on the device of the LM's input embeddings."""
    names = {id(m): n for n, m in model.named_modules()}
    embed_name = names[id(model.get_input_embeddings())]
    # The map's key for the embeddings is the longest key that prefixes its module name.
    owners = [k for k in device_map if k == "" or embed_name == k or embed_name.startswith(k + ".")]
    target = device_map[max(owners, key=len)]
    kept = {
        k: v
        for k, v in device_map.items()
        if not any(k == p or k.startswith(p + ".") for p in PINNED)
    }
    for prefix in PINNED:
        if getattr(model, prefix, None) is not None:
            kept[prefix] = target
    return kept


def dispatch(model: VisualChatModel, device_map: dict[str, int | str]) -> torch.device:
    """Place `model` by `device_map` (accelerate moves activations); return the input device."""
    from accelerate import dispatch_model

    dispatch_model(model, device_map, skip_keys=model._skip_keys_device_placement)
    target = device_map.get("mm_projector", next(iter(device_map.values())))
    return torch.device(f"cuda:{target}" if isinstance(target, int) else target)


def load_for_inference(
    folder: str | Path,
    device: str = "auto",
    dtype: str = "auto",
    device_map: str | None = None,
    base_lm: str | Path | None = None,
    base_vision: str | Path | None = None,
) -> LoadedModel:
    """Rebuild a model folder for chat or eval (see the module docstring).

    Args:
        folder: export or fused folder (config.yaml + meta.json).
        device: "auto", "cpu", "cuda", "cuda:N"; ignored with `device_map`.
        dtype: "auto", "fp32", "bf16", "fp16".
        device_map: None (one device) or "auto" | "balanced" | "sequential" (several GPUs).
        base_lm, base_vision: an export's base LM folder / vision encoder on this machine,
            instead of the paths its config.yaml names.

    Raises:
        CheckpointError: not a model folder, or a base model missing (names the override).
    """
    from dsvl_cli.model.folder import open_model_folder

    if device_map is not None and device_map not in DEVICE_MAPS:
        raise ConfigError(f"--device-map {device_map!r}: choose one of {', '.join(DEVICE_MAPS)}")
    folder = Path(folder)
    source = open_model_folder(folder, base_lm=base_lm, base_vision=base_vision)
    if device_map is not None:
        target = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = resolve_dtype(dtype, target)
        built = source.load(dtype=torch_dtype, device="cpu")
        placement = plan_device_map(built.model, device_map, torch_dtype)
        log.info("device map: %s", _describe_map(placement))
        input_device = dispatch(built.model, placement)
    else:
        input_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, input_device)
        built = source.load(dtype=torch_dtype, device=input_device)
    return LoadedModel(folder, built, source.config, input_device, torch_dtype)


def _describe_map(device_map: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for value in device_map.values():
        counts[str(value)] = counts.get(str(value), 0) + 1
    return ", ".join(f"{device}: {n} module(s)" for device, n in counts.items())
