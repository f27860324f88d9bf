"""Model exports (`epoch-K/`, `best/`, `final/`) and loading any dsvl model folder back.

An export holds what training changed, never the frozen base weights:

    config.yaml                 the resolved config (base model paths included)
    meta.json                   {"format": "dsvl-export", dsvl version, step, epoch, eval loss}
    model.safetensors           trained non-LoRA weights (projector, embeddings, full parts)
    adapters/<part>/            PEFT LoRA adapter per part (language_model, vision), in the format
                                `peft.PeftModel.from_pretrained(base, folder)` reads
    tokenizer files, image processor (preprocessor_config.json) when the encoder has one

Why not one PEFT adapter with `modules_to_save`: PEFT keeps a second copy of every module to
save, which would duplicate the whole embedding table (the original's waste we avoid); trained
non-LoRA weights live in the export's own `model.safetensors` instead, keyed by their names in
`VisualChatModel`, and `dsvl fuse-lora` turns an export into one standalone folder.

Under ZeRO-3 parameters are gathered (trainable ones only) on every rank and written by rank 0.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dsvl_cli import __version__
from dsvl_cli.config import Config, load_config, save_config
from dsvl_cli.errors import CheckpointError
from dsvl_cli.model.builder import Built, build_model
from dsvl_cli.model.vlm import VisualChatModel

EXPORT_FORMAT = "dsvl-export"
FUSED_FORMAT = "dsvl-fused"
LORA_PARTS = ("language_model", "vision")
PEFT_PREFIX = "base_model.model."


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def gathered_trainable_state(model: VisualChatModel) -> dict[str, torch.Tensor]:
    """Full CPU copies of every trainable parameter (ZeRO-3 partitions gathered on all ranks)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    partitioned = [p for _, p in named if hasattr(p, "ds_id")]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
            return {n: p.detach().cpu().clone() for n, p in named}
    return {n: p.detach().cpu().clone() for n, p in named}


def _split_lora(state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, dict]]:
    """Separate LoRA tensors per part (PEFT key format) from the other trained weights."""
    plain: dict[str, torch.Tensor] = {}
    adapters: dict[str, dict[str, torch.Tensor]] = {part: {} for part in LORA_PARTS}
    for name, tensor in state.items():
        part = name.split(".", 1)[0]
        if "lora_" in name and part in adapters:
            rel = name.split(".", 1)[1].replace(f".{part}.", ".")  # drop the adapter name
            adapters[part][PEFT_PREFIX + rel] = tensor
        else:
            plain[name] = tensor
    return plain, {k: v for k, v in adapters.items() if v}


def export_model(
    model: VisualChatModel, built: Built, config: Config, out: Path, meta: dict[str, Any]
) -> Path | None:
    """Write an export folder atomically (rank 0); every rank must call it under ZeRO-3."""
    state = gathered_trainable_state(model)
    if not _is_main():
        return None
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    plain, adapters = _split_lora(state)
    save_file({k: v.contiguous() for k, v in plain.items()}, tmp / "model.safetensors")
    for part, tensors in adapters.items():
        folder = tmp / "adapters" / part
        folder.mkdir(parents=True)
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, folder / "adapter_model.safetensors"
        )
        getattr(model, part).peft_config[part].save_pretrained(folder)
    save_config(config, tmp / "config.yaml")
    built.tokenizer.save_pretrained(tmp)
    if built.image_processor is not None:
        built.image_processor.save_pretrained(tmp)
    meta = {"format": EXPORT_FORMAT, "dsvl_version": __version__, **meta}
    meta["base_models"] = {
        "language_model": config.model.language_model,
        "vision": config.model.vision.path,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def read_meta(folder: Path) -> dict[str, Any]:
    """The folder's meta.json; CheckpointError if it is not a dsvl model folder."""
    path = folder / "meta.json"
    if not (folder / "config.yaml").is_file() or not path.is_file():
        raise CheckpointError(
            f"{folder} is not a dsvl model folder (needs config.yaml and meta.json); pass an "
            "export (output_dir/final, best, epoch-K) or a folder written by dsvl fuse-lora"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def load_adapters(model: VisualChatModel, folder: Path) -> None:
    """Load each `adapters/<part>/` PEFT adapter into the matching injected LoRA layers."""
    from peft import set_peft_model_state_dict

    for part in LORA_PARTS:
        file = folder / "adapters" / part / "adapter_model.safetensors"
        if not file.is_file():
            continue
        tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(file).items()}
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


def resolve_config(folder: Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The folder's config with relative model paths (fused folders) made absolute."""
    meta = read_meta(folder)
    config = load_config(folder / "config.yaml", list(overrides))
    if meta.get("format") != FUSED_FORMAT:
        return config
    vision = config.model.vision
    vision_update = {"path": str(folder / vision.path)}
    if vision.open_clip_model and vision.open_clip_model.endswith(".json"):
        vision_update["open_clip_model"] = str(folder / vision.open_clip_model)
    model = config.model.model_copy(
        update={
            "language_model": str(folder / config.model.language_model),
            "vision": vision.model_copy(update=vision_update),
        }
    )
    return config.model_copy(update={"model": model})


def load_model_folder(
    folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Built:
    """Rebuild the model an export or fused folder describes, weights loaded, in eval mode."""
    folder = Path(folder)
    config = resolve_config(folder)
    built = build_model(config, dtype=dtype)
    weights = folder / "model.safetensors"
    if weights.is_file():
        load_trained_weights(built.model, weights)
    load_adapters(built.model, folder)
    built.model.requires_grad_(False)
    built.model.to(device).eval()
    return built
