"""Every file read and write for vision encoders: local folders and weight files only.

* `clip`: a folder with a HF `CLIPVisionModel` (or full `CLIPModel`) saved by `save_pretrained`
  (`config.json`, weights) and a `CLIPImageProcessor` (`preprocessor_config.json`).
* `open_clip`: an open_clip model name (e.g. `ViT-L-14`) or a path to an open_clip model-config
  JSON (`{"embed_dim", "vision_cfg", "text_cfg"}`), plus a local open_clip checkpoint file.
* `qwen_vit`: the folder `dsvl extract-qwen` writes (`save_qwen_vit_folder`): `config.json`
  (`QwenViTConfig`), `preprocessor_config.json`, and `model.safetensors` (or `pytorch_model.bin`,
  read with `weights_only=True`). A folder from the original DSVL helper (its `config.json` is an
  OpenCLIP bigG `CLIPModel` config) also loads, with the Qwen-VL architecture defaults.

Nothing here downloads: a missing file is a `CheckpointError` that names it and says how to make it.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from open_clip.transformer import VisionTransformer
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from dsvl_cli.errors import CheckpointError, ConfigError
from dsvl_cli.log import get_logger
from dsvl_cli.model.qwen_vit import QwenViT, QwenViTConfig
from dsvl_cli.model.vision import (
    ClipVisionEncoder,
    HFImageTransform,
    ImageTransform,
    OpenClipVisionEncoder,
    QwenVisionEncoder,
    VisionEncoder,
)
from dsvl_cli.model.weights_file import (
    READ_ERRORS,
    first_line,
    key_diff,
    mismatch_line,
    open_clip_visual,
    read_weights,
)

log = get_logger(__name__)

VISION_KINDS = ("clip", "open_clip", "qwen_vit")
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
QWEN_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_CLIP_HINT = (
    "for kind 'clip' save a CLIPVisionModel and its CLIPImageProcessor with save_pretrained "
    "(e.g. openai/clip-vit-large-patch14)"
)
_QWEN_HINT = "for kind 'qwen_vit' write the folder with 'dsvl extract-qwen'"
OPEN_CLIP_FILE = (
    "a local open_clip checkpoint file (.safetensors, .bin or .pt), e.g. "
    "open_clip_pytorch_model.bin"
)


def load_vision_encoder(
    kind: str,
    path: str | None,
    open_clip_model: str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[VisionEncoder, ImageTransform]:
    """Load a vision encoder of `kind` from local files, with its image transform.

    `path` is the model folder (`clip`, `qwen_vit`) or the weights file (`open_clip`);
    `open_clip_model` names the open_clip architecture. `dtype` defaults to fp32.
    """
    dtype = dtype or torch.float32
    if kind == "clip":
        return load_clip(path, dtype)
    if kind == "qwen_vit":
        return load_qwen_vit(path, dtype)
    if kind == "open_clip":
        if not open_clip_model:
            raise ConfigError(
                "vision kind 'open_clip' needs open_clip_model: a model name such as ViT-L-14 "
                "or the path of an open_clip model-config JSON"
            )
        if not path:
            raise ConfigError(f"vision kind 'open_clip' needs model.vision.path: {OPEN_CLIP_FILE}")
        return build_open_clip_encoder(open_clip_model, path, dtype)
    raise ConfigError(f"unknown vision kind {kind!r}; choose one of {', '.join(VISION_KINDS)}")


def _folder(path: str | None, hint: str) -> Path:
    if path and Path(path).is_file():
        raise CheckpointError(
            f"vision encoder path {path} is a file, but this kind needs a folder; {hint} "
            "(an open_clip weights file is model.vision.kind=open_clip)"
        )
    if not path or not Path(path).is_dir():
        raise CheckpointError(f"vision encoder folder {path} does not exist; {hint}")
    return Path(path)


def _require(folder: Path, names: tuple[str, ...], hint: str) -> Path:
    """Return the first of `names` present in `folder`, or raise naming what is missing."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    wanted = " or ".join(names)
    raise CheckpointError(f"vision encoder folder {folder} has no {wanted}; {hint}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from err


def load_clip(path: str | None, dtype: torch.dtype) -> tuple[ClipVisionEncoder, HFImageTransform]:
    """Load a HF CLIP vision tower folder; refuses a folder whose weights leave keys unloaded."""
    folder = _folder(path, _CLIP_HINT)
    config_file = _require(folder, ("config.json",), _CLIP_HINT)
    model_type = _read_json(config_file).get("model_type")
    if model_type not in ("clip", "clip_vision_model"):
        raise CheckpointError(
            f"{config_file} describes a {model_type!r} model, not CLIP; set the vision kind to "
            "match the folder (qwen_vit folders come from 'dsvl extract-qwen')"
        )
    _require(folder, HF_WEIGHT_FILES, _CLIP_HINT)
    _require(folder, ("preprocessor_config.json",), _CLIP_HINT)
    try:
        model, info = CLIPVisionModel.from_pretrained(
            folder, dtype=dtype, local_files_only=True, output_loading_info=True
        )
    except READ_ERRORS as err:
        raise CheckpointError(
            f"{folder} does not load as a CLIP vision tower ({first_line(err)}); {_CLIP_HINT}"
        ) from None
    if info["missing_keys"]:
        raise CheckpointError(
            f"{folder} lacks {len(info['missing_keys'])} CLIP vision weights "
            f"(e.g. {sorted(info['missing_keys'])[:3]}); is it really a CLIP checkpoint?"
        )
    processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    return ClipVisionEncoder(model, processor), HFImageTransform(processor)


def qwen_config(folder: Path) -> QwenViTConfig:
    config_file = _require(folder, ("config.json",), _QWEN_HINT)
    data = _read_json(config_file)
    if (
        data.get("model_type") == "clip"
        and data.get("vision_config", {}).get("hidden_size") == 1664
    ):
        # The original helper shipped an unused OpenCLIP bigG config; its code hard-coded Qwen-VL.
        log.warning("%s comes from the original DSVL helper; using Qwen-VL's architecture", folder)
        return QwenViTConfig()
    return QwenViTConfig.from_json(config_file)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file, or of a `.bin`/`.pt` file read with weights_only=True.

    Raises:
        CheckpointError: the file is empty, unreadable or not a tensor dict (one line).
    """
    return read_weights(path, "the qwen_vit weights 'dsvl extract-qwen' writes")


def key_mismatches(
    model: torch.nn.Module, state: dict[str, torch.Tensor], examples: int = 4
) -> list[str]:
    """Missing, unexpected and mis-shaped keys of `state` against `model`, one line per kind."""
    missing, unexpected, shapes = key_diff(model, state, "{key} {found} != {expected}")
    return [
        f"{label} {len(keys)} (e.g. {', '.join(keys[:examples])})"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
        if keys
    ]


def _check_keys(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Raise a CheckpointError listing a few missing, unexpected or mis-shaped keys."""
    problems = key_mismatches(model, state)
    if problems:
        raise CheckpointError(
            f"{source} does not match its config.json: {'; '.join(problems)}; {_QWEN_HINT} "
            "(keys are transformer.visual.* with the prefix stripped and proj dropped)"
        )


def load_qwen_vit(
    path: str | None, dtype: torch.dtype
) -> tuple[QwenVisionEncoder, HFImageTransform]:
    """Load an extract-qwen folder strictly (every key, every shape)."""
    folder = _folder(path, _QWEN_HINT)
    config = qwen_config(folder)
    _require(folder, ("preprocessor_config.json",), _QWEN_HINT)
    weights = _require(folder, QWEN_WEIGHT_FILES, _QWEN_HINT)
    state = read_state_dict(weights)
    with torch.device("meta"):  # no random init of ~1.9B parameters that are overwritten next
        model = QwenViT(config)
    _check_keys(model, state, weights)
    model.load_state_dict(state, strict=True, assign=True)
    model.to(dtype)
    processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    return QwenVisionEncoder(model, processor), HFImageTransform(processor)


def save_qwen_vit_folder(
    folder: str | Path, config: QwenViTConfig, state_dict: dict[str, torch.Tensor]
) -> None:
    """Write a `qwen_vit` folder: config.json, preprocessor_config.json, model.safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.to_json(folder / "config.json")
    config.image_processor().save_pretrained(folder)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def open_clip_name(model_ref: str) -> str:
    """Registered open_clip model name for a built-in name or a model-config JSON path."""
    if not model_ref.endswith(".json"):
        if model_ref.replace("/", "-") not in open_clip.list_models():
            raise ConfigError(
                f"unknown open_clip model {model_ref!r}; use a name from open_clip.list_models() "
                "or the path of a model-config JSON"
            )
        return model_ref
    config_path = Path(model_ref)
    if not config_path.is_file():
        raise CheckpointError(f"open_clip model config {config_path} not found")
    if not {"embed_dim", "vision_cfg", "text_cfg"} <= set(_read_json(config_path)):
        raise CheckpointError(
            f"{config_path} is not an open_clip model config: it needs embed_dim, vision_cfg and "
            "text_cfg at the top level (an open_clip_config.json keeps them under model_cfg)"
        )
    open_clip.add_model_config(config_path)  # registered under the file's stem
    return config_path.stem


def open_clip_layer_config(name: str) -> CLIPVisionConfig:
    """One tower block's shape as a CLIPVisionConfig (for the `vit` projector)."""
    model_cfg = open_clip.get_model_config(name)
    vision = open_clip.CLIPVisionCfg(**model_cfg["vision_cfg"])
    return CLIPVisionConfig(
        hidden_size=vision.width,
        num_attention_heads=vision.width // vision.head_width,
        intermediate_size=int(vision.width * vision.mlp_ratio),
        hidden_act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
        layer_norm_eps=(vision.norm_kwargs or {}).get("eps", 1e-5),
    )


def build_open_clip_encoder(
    model_ref: str, weights: str | None, dtype: torch.dtype | None = None
) -> tuple[OpenClipVisionEncoder, ImageTransform]:
    """Build an open_clip image tower; `weights=None` leaves it randomly initialised (tests).

    The weights file is read here, not by open_clip: only its `visual.*` tensors are needed
    (an image-tower-only file loads too), and every problem is one line (`weights_file`).
    """
    name = open_clip_name(model_ref)
    state = None
    if weights is not None:  # read first: a bad file is reported before the model is built
        state = open_clip_visual(read_weights(Path(weights), OPEN_CLIP_FILE), Path(weights), name)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    visual = model.visual
    if not isinstance(visual, VisionTransformer):
        raise ConfigError(
            f"open_clip model {name} has a {type(visual).__name__} image tower; "
            "only VisionTransformer towers are supported"
        )
    if state is None:
        log.warning("open_clip model %s is randomly initialised (no weights file)", name)
    else:
        _load_visual(visual, state, weights, name)
    # ln_post and proj act on the pooled token only, which dsvl never uses: drop them.
    visual.prune_intermediate_layers(indices=1, prune_norm=True, prune_head=True)
    encoder = OpenClipVisionEncoder(visual.to(dtype or torch.float32), open_clip_layer_config(name))
    return encoder, preprocess


def _load_visual(
    visual: torch.nn.Module, state: dict[str, torch.Tensor], weights: str | None, name: str
) -> None:
    """Load the image tower strictly; a mismatch is one line naming shapes and keys."""
    problem = mismatch_line(visual, state)
    if problem:
        width = getattr(visual, "transformer", None)
        width = getattr(width, "width", "?")
        raise CheckpointError(
            f"{weights} does not load into open_clip {name} (image tower width {width}): "
            f"{problem}; set model.vision.open_clip_model to the architecture the file was "
            "trained with"
        )
    visual.load_state_dict(state, strict=True)
