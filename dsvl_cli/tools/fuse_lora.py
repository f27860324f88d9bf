"""`dsvl fuse-lora`: turn a training export into a standalone model folder, LoRA merged.

An export (`epoch-K/`, `best/`, `final/`, see `model/folder.py`) holds only what training changed
and points at the base model folders (`base_lm` / `base_vision` point it elsewhere). Fusing
loads it on CPU in the weights' dtype, merges every PEFT LoRA adapter into its base layer once
(PEFT's own merge, never unmerged, so no rounding drift), writes trained new-token embedding rows
into the LM's table, and writes:

    language_model/         the merged causal LM (`save_pretrained`, sharded safetensors), tokenizer
    vision/                 clip: CLIPVisionModel + image processor; qwen_vit: extract-qwen layout;
                            open_clip: vision/open_clip_model.safetensors (the full open_clip state
                            dict, image tower replaced by the merged one) and a copy of the
                            open_clip model-config JSON when the config names one
    model.safetensors       the projector (`mm_projector.*`)
    config.yaml             model paths relative to the folder (it loads from anywhere, copied
                            anywhere), every part frozen (no LoRA on load)
    meta.json               {"format": "dsvl-fused", provenance, max logit difference}
    manifest.json           every other file's size (and small files' sha256), written last

The folder loads with `load_model_folder` like any export, and its LM loads with plain
`transformers.AutoModelForCausalLM`. Logits of a fixed random probe (text ids around a run of
image tokens, random pixels) are compared before and after merging, and again after reloading
the written folder; the folder is published (temp dir swapped in, `dsvl_cli.atomic`) only when
both are within tolerance. A model with a NaN or Inf weight is refused before anything is written.

Default tolerance on the max abs logit difference: `REL_TOLERANCE[dtype] * max(1, max |logit|)`,
i.e. fp32 1e-4, fp16 1e-2, bf16 4e-2 relative to the probe's largest logit. Half precision rounds
each merged weight once (about 2^-11 / 2^-8 relative), which moves logits by a few of their ulps.
"""

from __future__ import annotations

import gc
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from dsvl_cli import __version__
from dsvl_cli.atomic import fresh_tmp, replace_dir
from dsvl_cli.config import Config, TrainableConfig, save_config
from dsvl_cli.errors import CheckpointError
from dsvl_cli.log import get_logger
from dsvl_cli.model.builder import Built
from dsvl_cli.model.finite import refuse_nonfinite
from dsvl_cli.model.folder import (
    EXPORT_FORMAT,
    FUSED_FORMAT,
    LORA_PARTS,
    ModelFolder,
    load_model_folder,
    open_model_folder,
)
from dsvl_cli.model.manifest import write_manifest
from dsvl_cli.model.vision_loader import save_qwen_vit_folder
from dsvl_cli.model.vlm import VisualChatModel

log = get_logger(__name__)

LM_DIR = "language_model"
VISION_DIR = "vision"
OPEN_CLIP_FILE = "open_clip_model.safetensors"
REL_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
PROBE_TEXT_TOKENS = 12
FROZEN = TrainableConfig(
    vision="frozen", language_model="frozen", projector=False, embeddings="frozen"
)


@dataclass(frozen=True)
class FuseResult:
    """What a fuse wrote and how closely the fused model matches its source."""

    out: Path
    max_abs_diff: float  # merged vs unmerged logits (0 when nothing was merged)
    reload_diff: float  # the written folder reloaded vs the in-memory merged model
    tolerance: float
    dtype: str
    merged_parts: tuple[str, ...]
    files: tuple[str, ...]  # paths relative to `out`


def fuse_lora(
    export_dir: Path,
    out: Path,
    force: bool = False,
    tolerance: float | None = None,
    max_shard_size: str = "5GB",
    dtype: torch.dtype | None = None,
    base_lm: Path | None = None,
    base_vision: Path | None = None,
) -> FuseResult:
    """Merge an export's LoRA adapters and trained weights into a standalone folder at `out`.

    `dtype` defaults to the base LM's saved dtype (config.json); `tolerance` bounds the max abs
    logit difference (default: see module docstring); `base_lm` / `base_vision` replace the
    export's base model paths. Raises CheckpointError for a fused or foreign source, a missing
    base model, an occupied `out` without `force`, or a difference over tolerance.
    """
    export_dir, out = Path(export_dir), Path(out)
    source = _open_export(export_dir, base_lm, base_vision)
    prepare_out(out, force, export_dir)
    config = source.config
    dtype = dtype or weights_dtype(config.model.language_model)
    built = source.load(dtype=dtype)
    # Before the probe: a non-finite weight would otherwise surface as "logits differ by nan".
    refuse_nonfinite(built.model.named_parameters(), out)
    inputs = probe_inputs(built.model)
    reference = probe_logits(built.model, inputs)
    merged_parts = merge_lora(built.model)
    folded = fold_token_embedding(built.model)
    merged = probe_logits(built.model, inputs)
    tol = tolerance if tolerance is not None else default_tolerance(dtype, reference)
    diff = compare_logits(reference, merged, tol, "merged vs unmerged")
    meta = {
        "source": {"path": str(source.path), "format": EXPORT_FORMAT, "meta": source.meta},
        "merged_lora": list(merged_parts),
        "folded_new_token_rows": folded,
        "max_abs_logit_diff": diff,
    }
    tmp = write_fused_folder(built, config, out, meta, max_shard_size)
    del built
    gc.collect()
    reload_diff, files = publish_verified(tmp, out, inputs, merged, tol, dtype)
    return FuseResult(out, diff, reload_diff, tol, _dtype_name(dtype), merged_parts, files)


# ----------------------------------------------------------------------------- checks


def _open_export(folder: Path, base_lm: Path | None, base_vision: Path | None) -> ModelFolder:
    """The export, read; refuses fused folders and original DSVL checkpoints."""
    if not (folder / "meta.json").is_file() and (folder / "pytorch_model.bin").is_file():
        raise CheckpointError(
            f"{folder} looks like an original DeepSpeed-VisualChat checkpoint (pytorch_model.bin, "
            "no meta.json); convert it with: dsvl fuse-lora --from-dsvl"
        )
    source = open_model_folder(folder, base_lm, base_vision)
    if source.format == FUSED_FORMAT:
        raise CheckpointError(
            f"{folder} is already fused; use it directly (meta.json format {FUSED_FORMAT})"
        )
    if source.format != EXPORT_FORMAT:
        raise CheckpointError(
            f"{folder}/meta.json has format {source.format!r}, expected {EXPORT_FORMAT!r}; "
            "pass an export folder (output_dir/final, best or epoch-K)"
        )
    return source


def prepare_out(out: Path, force: bool, source: Path) -> None:
    """Refuse an occupied `out` (unless force) and any `out` that overlaps the source."""
    target, src = out.resolve(), source.resolve()
    if target == src or target in src.parents or src in target.parents:
        raise CheckpointError(f"--out {out} overlaps the source {source}; choose a separate folder")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CheckpointError(f"--out {out} exists and is not empty; pass --force to replace it")


def weights_dtype(lm_folder: str | Path) -> torch.dtype:
    """The dtype a HF model folder's config.json says its weights are in (fp32 if unsaid)."""
    path = Path(lm_folder) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path} ({err}); is the base LM folder intact?") from err
    text = data.get("text_config") or {}
    name = next(
        (d[k] for d in (data, text) for k in ("dtype", "torch_dtype") if isinstance(d.get(k), str)),
        "float32",
    )
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or dtype not in REL_TOLERANCE:
        log.warning("%s gives dtype %r; fusing in float32", path, name)
        return torch.float32
    return dtype


def default_tolerance(dtype: torch.dtype, reference: torch.Tensor) -> float:
    """Max abs logit difference allowed by default: relative to the probe's largest logit."""
    scale = max(1.0, float(reference.abs().max()))
    return REL_TOLERANCE.get(dtype, REL_TOLERANCE[torch.float32]) * scale


def compare_logits(reference: torch.Tensor, other: torch.Tensor, tol: float, what: str) -> float:
    """Max abs difference; CheckpointError when over `tol` or not finite."""
    diff = float((reference - other).abs().max())
    log.info("%s logits: max abs diff %.3g (tolerance %.3g)", what, diff, tol)
    if not diff <= tol:  # also catches NaN
        raise CheckpointError(
            f"{what} logits differ by {diff:.3g} (tolerance {tol:.3g}); the checkpoint may be "
            "damaged or mismatched with its base models (pass --tolerance to override)"
        )
    return diff


# ----------------------------------------------------------------------------- probe


def probe_inputs(model: VisualChatModel, seed: int = 0) -> dict[str, torch.Tensor]:
    """One fixed random sample: text ids, a run of image tokens, more text; random pixels."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().num_embeddings
    text = torch.randint(0, vocab - 1, (1, PROBE_TEXT_TOKENS), generator=gen)
    text = text + (text >= model.image_token_id).long()  # never the image id itself
    image = torch.full((1, model.tokens_per_image), model.image_token_id)
    half = PROBE_TEXT_TOKENS // 2
    ids = torch.cat([text[:, :half], image, text[:, half:]], dim=1)
    size = model.vision.image_size
    pixels = torch.randn(1, 3, size, size, generator=gen)
    return {"input_ids": ids, "pixel_values": pixels, "attention_mask": torch.ones_like(ids)}


def probe_logits(model: VisualChatModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [1, L, V] in fp32 for the probe, in eval mode without gradients."""
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits.float()


# ----------------------------------------------------------------------------- merge


def merge_lora(model: VisualChatModel) -> tuple[str, ...]:
    """Merge each part's injected PEFT LoRA into its base layers and drop the LoRA wrappers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = []
    for part in LORA_PARTS:
        submodule = getattr(model, part)
        layers = [(n, m) for n, m in submodule.named_modules() if isinstance(m, BaseTunerLayer)]
        for name, layer in layers:
            # safe_merge: merge into a copy and refuse non-finite results.
            layer.merge(safe_merge=True, adapter_names=[part])
            parent, _, child = name.rpartition(".")
            setattr(submodule.get_submodule(parent), child, layer.get_base_layer())
        if hasattr(submodule, "peft_config"):
            del submodule.peft_config
        if layers:
            merged.append(part)
            log.info("merged %d LoRA layers of %s", len(layers), part)
    leftover = [n for n, _ in model.named_parameters() if "lora_" in n]
    if leftover:
        raise CheckpointError(f"LoRA weights left after merging ({leftover[:3]}); unknown adapter")
    return tuple(merged)


def fold_token_embedding(model: VisualChatModel) -> int:
    """Write trained new-token rows (trainable.embeddings=new_tokens) into the LM's table."""
    token_embed = model.token_embed
    if token_embed is None:
        return 0
    lm = model.language_model
    table = lm.get_input_embeddings()
    head = lm.get_output_embeddings()
    if head is not None and head.weight is table.weight:
        # Training changed the input rows only; keep the (tied) output rows as they were.
        head.weight = nn.Parameter(table.weight.detach().clone(), requires_grad=False)
        for config in {id(c): c for c in (lm.config, lm.config.get_text_config())}.values():
            config.tie_word_embeddings = False
    with torch.no_grad():
        table.weight.copy_(token_embed.merged_weight())
    model.token_embed = None
    return int(token_embed.new_rows.shape[0])


# ----------------------------------------------------------------------------- writing


def fused_config(config: Config, vision_paths: dict[str, str]) -> Config:
    """`config` with model paths relative to the fused folder and every part frozen.

    `vision_paths` updates `model.vision` (its path, and open_clip_model for a copied JSON).
    """
    vision = config.model.vision.model_copy(update=vision_paths)
    model = config.model.model_copy(update={"language_model": LM_DIR, "vision": vision})
    return config.model_copy(update={"model": model, "trainable": FROZEN})


def write_fused_folder(
    built: Built, config: Config, out: Path, meta: dict[str, Any], max_shard_size: str
) -> Path:
    """Write the merged model to a temp folder beside `out`; returns the temp folder.

    Raises CheckpointError, writing nothing, when a weight is NaN or Inf.
    """
    model = built.model
    refuse_nonfinite(model.named_parameters(), out)
    tmp = fresh_tmp(out)
    model.language_model.save_pretrained(tmp / LM_DIR, max_shard_size=max_shard_size)
    built.tokenizer.save_pretrained(tmp / LM_DIR)
    vision_paths = save_vision(model, config, tmp / VISION_DIR, max_shard_size)
    projector = {
        f"mm_projector.{n}": p.detach().contiguous()
        for n, p in model.mm_projector.named_parameters()
    }
    save_file(projector, tmp / "model.safetensors", metadata={"format": "pt"})
    save_config(fused_config(config, vision_paths), tmp / "config.yaml")
    full_meta = {"format": FUSED_FORMAT, "dsvl_version": __version__, **meta}
    (tmp / "meta.json").write_text(json.dumps(full_meta, indent=2) + "\n", encoding="utf-8")
    write_manifest(tmp, editable=("config.yaml",))
    return tmp


def save_vision(
    model: VisualChatModel, config: Config, folder: Path, max_shard_size: str
) -> dict[str, str]:
    """Write the (merged) vision encoder in the layout its kind loads.

    Returns the `model.vision` fields for config.yaml, relative to the fused folder.
    """
    encoder = model.vision
    if encoder.kind == "clip":
        encoder.model.save_pretrained(folder, max_shard_size=max_shard_size)
        encoder.image_processor.save_pretrained(folder)
        return {"path": VISION_DIR}
    if encoder.kind == "qwen_vit":
        save_qwen_vit_folder(folder, encoder.model.config, encoder.model.state_dict())
        if encoder.image_processor is not None:
            encoder.image_processor.save_pretrained(folder)
        return {"path": VISION_DIR}
    if encoder.kind == "open_clip":
        _save_open_clip(encoder.visual, resolve_source_path(config), folder / OPEN_CLIP_FILE)
        paths = {"path": f"{VISION_DIR}/{OPEN_CLIP_FILE}"}
        model_json = config.model.vision.open_clip_model
        if model_json and model_json.endswith(".json"):
            # Copied under its own name: open_clip registers a model config by the file's stem.
            shutil.copyfile(model_json, folder / Path(model_json).name)
            paths["open_clip_model"] = f"{VISION_DIR}/{Path(model_json).name}"
        return paths
    raise CheckpointError(f"cannot write a vision encoder of kind {encoder.kind!r}")


def resolve_source_path(config: Config) -> Path:
    """The open_clip weights file the config names (absolute in exports)."""
    path = Path(config.model.vision.path)
    if not path.is_file():
        raise CheckpointError(f"open_clip weights {path} (model.vision.path) not found")
    return path


def _save_open_clip(visual: nn.Module, source: Path, target: Path) -> None:
    """The source open_clip state dict with its image tower replaced by `visual`'s weights.

    open_clip loads checkpoints strictly (text tower included), and dsvl's encoder drops the
    tower's ln_post/proj, so the untouched tensors come from the original file.
    """
    from open_clip.factory import load_state_dict

    state = load_state_dict(str(source), weights_only=True)
    tower = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    bad = [k for k, v in tower.items() if k not in state or state[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"{source} does not match the trained open_clip tower ({bad[:3]})")
    state.update(tower)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, target)


def _relative_files(folder: Path) -> tuple[str, ...]:
    return tuple(sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()))


def publish_verified(
    tmp: Path,
    out: Path,
    inputs: dict[str, torch.Tensor],
    expected: torch.Tensor,
    tol: float,
    dtype: torch.dtype,
) -> tuple[float, tuple[str, ...]]:
    """Reload `tmp` with `load_model_folder`, compare its logits, then swap it in as `out`."""
    try:
        reloaded = load_model_folder(tmp, dtype=dtype)
        diff = compare_logits(expected, probe_logits(reloaded.model, inputs), tol, "reloaded")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    del reloaded
    files = _relative_files(tmp)
    replace_dir(tmp, out)
    log.info("wrote standalone model folder %s (%d files)", out, len(files))
    return diff, files


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
