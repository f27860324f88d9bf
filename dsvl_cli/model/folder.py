"""dsvl model folders: the export and fused formats, written and read only here.

An export (`output_dir/final`, `best`, `epoch-K`) holds what training changed, never the frozen
base weights:

    config.yaml                 the resolved config; base model paths absolute
    meta.json                   {"format": "dsvl-export", dsvl version, step, epoch, eval loss,
                                 base_models}
    model.safetensors           trained non-LoRA weights (projector, embeddings, full parts),
                                keyed by their names in `VisualChatModel`
    adapters/language_model/    PEFT LoRA adapter of the causal LM (task_type CAUSAL_LM,
                                base_model_name_or_path = the base LM folder)
    adapters/vision/            PEFT LoRA adapter of the vision encoder, keyed like the plain
                                encoder module (HF CLIPVisionModel for clip), base path = encoder
    tokenizer files, image processor (preprocessor_config.json) when the encoder has one
    manifest.json               every other file's size (and sha256 up to 64 MiB), written last

Both adapters load with plain PEFT onto plain transformers models, e.g.
`peft.AutoPeftModelForCausalLM.from_pretrained(export / "adapters/language_model")`; they carry
LoRA only (trained embeddings and the projector stay in model.safetensors).

A fused folder (`dsvl fuse-lora`) holds whole models with paths relative to itself. Base paths of
an export are absolute, so it loads from any working directory; on another machine
`open_model_folder(..., base_lm=..., base_vision=...)` (CLI `--base-lm`, `--base-vision`) points
them at the local copies. Exports from earlier versions (base paths relative to the training
directory, vision adapter keys under dsvl's encoder wrapper) still load.

A folder is loaded only when its manifest checks out (`model/manifest.py`): a folder that a kill
left without its weights is refused with one line naming the first missing file, instead of
loading base weights silently. Folders from before manifests load with a warning if their
config.yaml, meta.json and model.safetensors are there. Writers publish folders through
`dsvl_cli.atomic` (written aside, fsynced, swapped in), so a complete copy always exists.

Why not one PEFT adapter with `modules_to_save`: PEFT keeps a second copy of every module to
save, which would duplicate the whole embedding table.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dsvl_cli import __version__
from dsvl_cli.config import Config, load_config, save_config
from dsvl_cli.errors import CheckpointError, ConfigError
from dsvl_cli.log import get_logger
from dsvl_cli.model.builder import Built, build_model
from dsvl_cli.model.manifest import (
    MODEL_FOLDER_FILES,
    has_manifest,
    require_complete,
    spare_copy,
    write_manifest,
)
from dsvl_cli.model.vlm import VisualChatModel

log = get_logger(__name__)

EXPORT_FORMAT = "dsvl-export"
FUSED_FORMAT = "dsvl-fused"
LORA_PARTS = ("language_model", "vision")
PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
WEIGHTS_FILE = "model.safetensors"
ADAPTERS_DIR = "adapters"
ADAPTER_FILE = "adapter_model.safetensors"
BASE_LM_OPTION = "--base-lm"
BASE_VISION_OPTION = "--base-vision"
INCOMPLETE_FIX = (
    "it was interrupted while being written: use another export of the run (final/, best/, "
    "epoch-K/), resume the run (train.resume=auto) to export it again, or run dsvl fuse-lora "
    "again for a fused folder"
)


def absolute(path: str | Path) -> str:
    """`path` made absolute against the current directory (`~` expanded, symlinks kept)."""
    return os.path.abspath(Path(path).expanduser())


def _is_json_path(ref: str | None) -> bool:
    return bool(ref) and str(ref).endswith(".json")


# ----------------------------------------------------------------------------- writing


def with_absolute_bases(config: Config) -> Config:
    """`config` with its base model paths (and an open_clip model-config JSON) made absolute."""
    vision = config.model.vision
    update: dict[str, Any] = {"path": absolute(vision.path)}
    if _is_json_path(vision.open_clip_model):
        update["open_clip_model"] = absolute(vision.open_clip_model)
    model = config.model.model_copy(
        update={
            "language_model": absolute(config.model.language_model),
            "vision": vision.model_copy(update=update),
        }
    )
    return config.model_copy(update={"model": model})


def adapter_root(model: VisualChatModel, part: str) -> str:
    """Prefix of `part`'s plain module inside dsvl's submodule ('' or e.g. 'model.')."""
    if part == "vision":
        wrapped = getattr(model.vision, "wrapped", None)
        return f"{wrapped}." if wrapped else ""
    return ""


def drop_adapter_name(name: str, adapter: str) -> str:
    """`...q_proj.lora_A.vision.weight` -> `...q_proj.lora_A.weight` (only after a lora_ module)."""
    return re.sub(rf"\.(lora_[A-Za-z_]+)\.{re.escape(adapter)}(?=\.|$)", r".\1", name)


def split_trained_state(
    model: VisualChatModel, state: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Trained tensors -> (non-LoRA weights, {part: LoRA tensors in plain PEFT key format}).

    Adapter keys are relative to the part's plain module (see `adapter_root`), prefixed with
    PEFT's `base_model.model.`, without the adapter name: what `PeftModel` saves.
    """
    plain: dict[str, torch.Tensor] = {}
    adapters: dict[str, dict[str, torch.Tensor]] = {part: {} for part in LORA_PARTS}
    for name, tensor in state.items():
        part, _, rel = name.partition(".")
        if "lora_" not in name or part not in adapters:
            plain[name] = tensor
            continue
        root = adapter_root(model, part)
        if not rel.startswith(root):
            raise CheckpointError(f"LoRA weight {name} lies outside the {part}'s module {root}")
        key = PEFT_PREFIX + drop_adapter_name(rel.removeprefix(root), part)
        adapters[part][key] = tensor
    return plain, {k: v for k, v in adapters.items() if v}


def _adapter_config(model: VisualChatModel, part: str, config: Config) -> Any:
    """The part's PEFT LoraConfig, with the base path and task type plain PEFT needs."""
    peft_config = copy.copy(getattr(model, part).peft_config[part])
    if part == "language_model":
        peft_config.base_model_name_or_path = config.model.language_model
        peft_config.task_type = "CAUSAL_LM"
    else:
        peft_config.base_model_name_or_path = config.model.vision.path
    return peft_config


def write_export_folder(
    folder: Path,
    model: VisualChatModel,
    built: Built,
    config: Config,
    state: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> None:
    """Write an export of `model`'s trained tensors `state` into the empty `folder`.

    `built` gives the tokenizer and image processor. Base paths are stored absolute (resolved
    against the current directory, the one the recipe's relative paths were read from). The
    manifest comes last; the caller has refused non-finite `state` (`model/finite.py`) and
    publishes `folder` (`dsvl_cli.atomic.replace_dir`).
    """
    config = with_absolute_bases(config)
    plain, adapters = split_trained_state(model, state)
    save_file({k: v.contiguous() for k, v in plain.items()}, folder / WEIGHTS_FILE)
    for part, tensors in adapters.items():
        target = folder / ADAPTERS_DIR / part
        target.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, target / ADAPTER_FILE)
        _adapter_config(model, part, config).save_pretrained(target)
    save_config(config, folder / CONFIG_FILE)
    built.tokenizer.save_pretrained(folder)
    if built.image_processor is not None:
        built.image_processor.save_pretrained(folder)
    meta = {"format": EXPORT_FORMAT, "dsvl_version": __version__, **meta}
    meta["base_models"] = {
        "language_model": config.model.language_model,
        "vision": config.model.vision.path,
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    write_manifest(folder, editable=(CONFIG_FILE,))


# ----------------------------------------------------------------------------- reading


def read_meta(folder: Path) -> dict[str, Any]:
    """The folder's meta.json; CheckpointError if it is not a dsvl model folder."""
    path = folder / META_FILE
    if not (folder / CONFIG_FILE).is_file() or not path.is_file():
        raise CheckpointError(
            f"{folder} is not a dsvl model folder (needs config.yaml and meta.json); pass an "
            "export (output_dir/final, best, epoch-K) or a folder written by dsvl fuse-lora"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None


@dataclass(frozen=True)
class ModelFolder:
    """One model folder, read once: where it is, its meta.json, its config ready to build.

    Attributes:
        path: the folder, absolute.
        meta: meta.json ("format" is EXPORT_FORMAT or FUSED_FORMAT).
        config: config.yaml with every model path absolute and base overrides applied.
    """

    path: Path
    meta: dict[str, Any]
    config: Config

    @property
    def format(self) -> str | None:
        return self.meta.get("format")

    def load(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Built:
        """Rebuild the model, trained weights and adapters loaded, frozen, in eval mode."""
        built = build_model(self.config, dtype=dtype)
        load_trained_weights(built.model, self.path / WEIGHTS_FILE)
        load_adapters(built.model, self.path)
        built.model.requires_grad_(False)
        built.model.to(device).eval()
        return built


def open_model_folder(
    folder: str | Path,
    base_lm: str | Path | None = None,
    base_vision: str | Path | None = None,
) -> ModelFolder:
    """Read a model folder's meta.json and config.yaml; check its base models exist.

    `base_lm` / `base_vision` replace an export's `model.language_model` / `model.vision.path`
    (base models that live elsewhere on this machine). Raises CheckpointError for a folder that
    is not a dsvl model folder or names a missing base model (the message names the config.yaml
    field and the override), ConfigError for an override given with a fused folder.
    """
    path = Path(absolute(folder))
    check_complete(path)
    meta = read_meta(path)
    config = load_config(path / CONFIG_FILE)
    if meta.get("format") == FUSED_FORMAT:
        if base_lm is not None or base_vision is not None:
            raise ConfigError(
                f"{path} is a fused folder that carries its own base models; "
                f"{BASE_LM_OPTION} and {BASE_VISION_OPTION} apply to exports only"
            )
        return ModelFolder(path, meta, _resolve_fused(config, path))
    config = _override_bases(config, base_lm, base_vision)
    _check_bases(config, path / CONFIG_FILE)
    return ModelFolder(path, meta, config)


def check_complete(path: Path) -> None:
    """CheckpointError for a model folder that is missing files it was written with."""
    if not has_manifest(path) and spare_copy(path, MODEL_FOLDER_FILES) is None:
        read_meta(path)  # not a model folder at all: say that rather than name a missing file
    require_complete(path, MODEL_FOLDER_FILES, INCOMPLETE_FIX)


def _resolve_fused(config: Config, folder: Path) -> Config:
    """Fused folders store their model paths relative to themselves: make them absolute."""
    vision = config.model.vision
    update = {"path": str(folder / vision.path)}
    if _is_json_path(vision.open_clip_model):
        update["open_clip_model"] = str(folder / vision.open_clip_model)
    model = config.model.model_copy(
        update={
            "language_model": str(folder / config.model.language_model),
            "vision": vision.model_copy(update=update),
        }
    )
    return config.model_copy(update={"model": model})


def _override_bases(
    config: Config, base_lm: str | Path | None, base_vision: str | Path | None
) -> Config:
    update: dict[str, Any] = {}
    if base_lm is not None:
        update["language_model"] = absolute(base_lm)
        log.info("base language model: %s (%s)", update["language_model"], BASE_LM_OPTION)
    if base_vision is not None:
        vision_path = absolute(base_vision)
        update["vision"] = config.model.vision.model_copy(update={"path": vision_path})
        log.info("base vision encoder: %s (%s)", vision_path, BASE_VISION_OPTION)
    if not update:
        return config
    return config.model_copy(update={"model": config.model.model_copy(update=update)})


def _check_bases(config: Config, config_file: Path) -> None:
    """CheckpointError naming the config.yaml field and the override for a missing base path."""
    vision = config.model.vision
    checks = [
        ("model.language_model", config.model.language_model, BASE_LM_OPTION, "base LM folder"),
        ("model.vision.path", vision.path, BASE_VISION_OPTION, "vision encoder"),
    ]
    for field, value, option, what in checks:
        if not Path(value).exists():
            where = "" if Path(value).is_absolute() else " (relative to the current directory)"
            raise CheckpointError(
                f"{config_file}: {field} {value!r} does not exist{where}; pass {option} "
                f"NEW_PATH (the {what} on this machine)"
            )
    if _is_json_path(vision.open_clip_model) and not Path(vision.open_clip_model).is_file():
        raise CheckpointError(
            f"{config_file}: model.vision.open_clip_model {vision.open_clip_model!r} does not "
            "exist; copy that open_clip model-config JSON there (or edit the field)"
        )


def _adapter_tensors(model: VisualChatModel, part: str, file: Path) -> dict[str, torch.Tensor]:
    """The adapter file's tensors keyed relative to dsvl's `part` submodule.

    Current exports key vision adapters like the plain encoder module; earlier ones like dsvl's
    wrapper around it: both are accepted, anything else is refused.
    """
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(file).items()}
    submodule = getattr(model, part)
    expected = {drop_adapter_name(n, part) for n, _ in submodule.named_parameters()}
    root = adapter_root(model, part)
    if all(root + k in expected for k in tensors):
        return {root + k: v for k, v in tensors.items()}
    if all(k in expected for k in tensors):
        return tensors  # an earlier export: keys under dsvl's wrapper
    unknown = [k for k in tensors if root + k not in expected][:3]
    raise CheckpointError(
        f"{file}: adapter keys {unknown} match no LoRA layer of the {part}; was config.yaml "
        "(lora or trainable sections) edited after export?"
    )


def load_adapters(model: VisualChatModel, folder: Path) -> None:
    """Load each `adapters/<part>/` PEFT adapter into the matching injected LoRA layers."""
    from peft import set_peft_model_state_dict

    for part in LORA_PARTS:
        file = folder / ADAPTERS_DIR / part / ADAPTER_FILE
        has_lora = hasattr(getattr(model, part), "peft_config")
        if not file.is_file():
            if has_lora:  # the LoRA layers would keep their initial (no-op) weights silently
                raise CheckpointError(
                    f"{file} is missing but config.yaml trains the {part} with LoRA; "
                    f"{INCOMPLETE_FIX}"
                )
            continue
        if not has_lora:
            raise CheckpointError(
                f"{file} exists but config.yaml does not train the {part} with LoRA "
                f"(trainable.{part}); was config.yaml edited after export?"
            )
        tensors = _adapter_tensors(model, part, file)
        result = set_peft_model_state_dict(getattr(model, part), tensors, adapter_name=part)
        if result.unexpected_keys:
            raise CheckpointError(f"{file}: unexpected adapter keys {result.unexpected_keys[:3]}")


def load_trained_weights(model: VisualChatModel, file: Path) -> None:
    """Load an export's model.safetensors; every key must name a parameter of the model."""
    tensors = load_file(file)
    names = dict(model.named_parameters())
    unknown = [k for k in tensors if k not in names]
    if unknown:
        raise CheckpointError(
            f"{file} has weights the rebuilt model lacks ({unknown[:3]}); was config.yaml edited?"
        )
    with torch.no_grad():
        for key, value in tensors.items():
            names[key].copy_(value.to(names[key].dtype))


def load_model_folder(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    base_lm: str | Path | None = None,
    base_vision: str | Path | None = None,
) -> Built:
    """Rebuild the model an export or fused folder describes (see `open_model_folder`)."""
    return open_model_folder(folder, base_lm, base_vision).load(dtype, device)
