"""`dsvl fuse-lora --from-dsvl`: an original DeepSpeed-VisualChat epoch folder -> a fused folder.

The original saves `epoch-K/pytorch_model.bin`, the whole `DeepSpeedViLModel.state_dict()`, with
LoRA already fused into the base weights, plus its tokenizer files and
`train_args.pt`. Key mapping into `VisualChatModel`:

    lang_decoder.*          -> language_model.*          (the causal LM, lm_head included)
    lang_embed.weight       -> the LM's input embedding table (the trained copy; the decoder's own
                               embed_tokens in the file is a dead, untrained copy and is dropped)
    projection.*            -> mm_projector.projection.* (baseline = Linear 0 + LayerNorm 1)
                               mm_projector.*            (vit, perceiver: same submodule names)
    vis_encoder.*           -> vision.model.*            (clip: CLIPVisionModel keys, the
                                                          transformers-4 `vision_model.` level
                                                          removed; qwen_vit: extract-qwen layout)
    *.lora_right_weight / *.lora_left_weight, rotary inv_freq, position_ids: dropped

Vocabulary: the original tokenizer added `### Image:`, `<image>` and `<PAD>` (32003 rows for
LLaMA-2); dsvl adds only `<image>` (its template writes `### Image k:` as plain text, and pad is EOS
in both). Rows are picked by token string from the checkpoint's tokenizer files, so `<image>` keeps
its trained row wherever the original put it; the rows of `### Image:` and `<PAD>` are dropped.

The original reversed the order of images within a multi-image sample (its issue #800); dsvl places
them in order. The converted folder records `image_order: reversed` in meta.json and a warning is
logged: multi-image prompts see a different arrangement than the model was trained on.
"""

from __future__ import annotations

import gc
import json
import pickle
from pathlib import Path
from typing import Any

import torch

from dsvl_cli.config import Config, validate_config
from dsvl_cli.errors import CheckpointError
from dsvl_cli.log import get_logger
from dsvl_cli.model.builder import build_model
from dsvl_cli.model.vision_loader import key_mismatches
from dsvl_cli.model.vlm import VisualChatModel
from dsvl_cli.tools.fuse_lora import (
    FROZEN,
    FuseResult,
    default_tolerance,
    prepare_out,
    probe_inputs,
    probe_logits,
    publish_verified,
    write_fused_folder,
)

log = get_logger(__name__)

WEIGHTS = "pytorch_model.bin"
ORIGINAL_FORMAT = "deepspeed-visualchat"
VISION_PREFIX = "vision.model."
LEGACY_CLIP_PREFIX = VISION_PREFIX + "vision_model."
ORIGINAL_PROJECTORS = {"baseline": "linear", "vit": "vit", "perceiver": "perceiver"}
DROPPED_SUFFIXES = ("lora_right_weight", "lora_left_weight", "rotary_emb.inv_freq", "position_ids")
REVERSED_NOTE = (
    "trained by the original DeepSpeed-VisualChat, which placed the images of a multi-image sample "
    "in reverse order (its issue #800); dsvl places them in order, so multi-image prompts differ "
    "from what this model saw in training (single-image prompts are unaffected)"
)


def convert_dsvl_checkpoint(
    epoch_dir: Path,
    out: Path,
    lm_path: str,
    vision_kind: str,
    vision_path: str,
    projector: str | None = None,
    mmca: bool | None = None,
    force: bool = False,
    tolerance: float | None = None,
    max_shard_size: str = "5GB",
) -> FuseResult:
    """Convert an original DSVL epoch folder into a standalone dsvl folder at `out`.

    `lm_path` / `vision_path` are the base models the original was trained from (they give the
    architecture, tokenizer and image processor; their weights are replaced). `projector` and
    `mmca` default to the values in `train_args.pt` when it can be read safely, else linear / on.
    """
    epoch_dir, out = Path(epoch_dir), Path(out)
    weights = _check_arguments(epoch_dir, vision_kind, projector)
    prepare_out(out, force, epoch_dir)
    args = read_train_args(epoch_dir)
    config = legacy_config(args, lm_path, vision_kind, vision_path, projector, mmca)
    state = load_original(weights)
    dtype = state["lang_embed.weight"].dtype
    built = build_model(config, dtype=dtype)
    index, dropped_tokens = vocab_index(built.tokenizer, epoch_dir, _base_vocab(lm_path))
    mapped = map_state(state, built.model, index, config.model.projector)
    check_keys(mapped, built.model, weights)
    built.model.load_state_dict(mapped, strict=True)
    del state, mapped
    inputs = probe_inputs(built.model)
    logits = probe_logits(built.model, inputs)
    if not torch.isfinite(logits).all():
        raise CheckpointError(f"{weights} gives non-finite logits; the checkpoint is damaged")
    tol = tolerance if tolerance is not None else default_tolerance(dtype, logits)
    log.warning("%s was %s", epoch_dir, REVERSED_NOTE)
    meta = {
        "source": {
            "path": str(epoch_dir.resolve()),
            "format": ORIGINAL_FORMAT,
            "train_args": {k: v for k, v in args.items() if isinstance(v, (str, int, float, bool))},
        },
        "image_order": "reversed",
        "image_order_note": REVERSED_NOTE,
        "dropped_tokens": dropped_tokens,
        "max_abs_logit_diff": 0.0,
    }
    tmp = write_fused_folder(built, config, out, meta, max_shard_size)
    del built
    gc.collect()
    reload_diff, files = publish_verified(tmp, out, inputs, logits, tol, dtype)
    return FuseResult(out, 0.0, reload_diff, tol, str(dtype).removeprefix("torch."), (), files)


def _check_arguments(epoch_dir: Path, vision_kind: str, projector: str | None) -> Path:
    """The weights file of `epoch_dir`; CheckpointError for choices the original never had."""
    weights = epoch_dir / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(
            f"{epoch_dir} has no {WEIGHTS}; pass an original DeepSpeed-VisualChat epoch-K folder"
        )
    if vision_kind not in ("clip", "qwen_vit"):
        raise CheckpointError(
            f"original DSVL checkpoints use clip or qwen_vit, not {vision_kind!r}"
        )
    kinds = ", ".join(ORIGINAL_PROJECTORS.values())
    if projector is not None and projector not in ORIGINAL_PROJECTORS.values():
        raise CheckpointError(f"the original has projectors {kinds}, not {projector!r}")
    return weights


def legacy_config(
    args: dict[str, Any],
    lm_path: str,
    vision_kind: str,
    vision_path: str,
    projector: str | None,
    mmca: bool | None,
) -> Config:
    """The dsvl config of the converted model (arguments first, then train_args.pt)."""
    if mmca is None:
        mmca = bool(args.get("enable_mmca_attention", True))
    model = {
        "language_model": lm_path,
        "vision": {"kind": vision_kind, "path": vision_path},
        "projector": projector or _original_projector(args),
        "mmca": mmca,
        "max_seq_len": args.get("max_seq_len", 4096),
    }
    tree = {"model": model, "trainable": FROZEN.model_dump()}
    return validate_config(tree, where="--from-dsvl arguments")


def load_original(weights: Path) -> dict[str, torch.Tensor]:
    """The original state dict, memory-mapped, read with weights_only=True."""
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError) as err:
        raise CheckpointError(f"{weights} cannot be read as tensors only ({err})") from err
    if not isinstance(state, dict) or "lang_embed.weight" not in state:
        raise CheckpointError(f"{weights} is not a DeepSpeed-VisualChat state dict (no lang_embed)")
    return state


def read_train_args(epoch_dir: Path) -> dict[str, Any]:
    """`train_args.pt` if it loads with weights_only=True (plain values); else empty."""
    path = epoch_dir / "train_args.pt"
    if not path.is_file():
        return {}
    try:
        args = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as err:
        log.info("ignoring %s: not loadable with weights_only=True (%s)", path, err)
        return {}
    return args if isinstance(args, dict) else {}


def _original_projector(args: dict[str, Any]) -> str:
    name = str(args.get("vis_proj", "baseline"))
    if name not in ORIGINAL_PROJECTORS:
        raise CheckpointError(f"train_args.pt has unknown vis_proj {name!r}; pass the projector")
    return ORIGINAL_PROJECTORS[name]


def _base_vocab(lm_path: str) -> int:
    """Rows of the base LM before dsvl added tokens (its config.json vocab_size)."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(lm_path).get_text_config().vocab_size)


def original_added_tokens(epoch_dir: Path) -> dict[str, int]:
    """Added token -> id, from added_tokens.json or tokenizer.json of the original's tokenizer."""
    added = epoch_dir / "added_tokens.json"
    if added.is_file():
        return {str(k): int(v) for k, v in json.loads(added.read_text(encoding="utf-8")).items()}
    tokenizer = epoch_dir / "tokenizer.json"
    if tokenizer.is_file():
        data = json.loads(tokenizer.read_text(encoding="utf-8"))
        return {t["content"]: int(t["id"]) for t in data.get("added_tokens", [])}
    raise CheckpointError(
        f"{epoch_dir} has neither added_tokens.json nor tokenizer.json; the original saves its "
        "tokenizer beside pytorch_model.bin and the <image> row cannot be found without it"
    )


def vocab_index(tokenizer: Any, epoch_dir: Path, base_vocab: int) -> tuple[torch.Tensor, dict]:
    """For each dsvl token id, the row of the original table holding it; and dropped tokens."""
    original = original_added_tokens(epoch_dir)
    index = torch.arange(len(tokenizer))
    for token_id in range(base_vocab, len(tokenizer)):
        token = tokenizer.convert_ids_to_tokens(token_id)
        if token not in original:
            raise CheckpointError(
                f"token {token!r} is not in the tokenizer saved in {epoch_dir}; was the checkpoint "
                "trained from a different language model than --lm?"
            )
        index[token_id] = original[token]
    kept = set(index.tolist())
    dropped = {t: i for t, i in original.items() if i >= base_vocab and i not in kept}
    log.info("dropping original token rows %s (unused by dsvl)", dropped)
    return index, dropped


def _embedding_names(model: VisualChatModel) -> tuple[str, str | None]:
    """State-dict names of the LM's input and output embedding weights."""
    lm = model.language_model
    names = {id(p): n for n, p in lm.named_parameters(remove_duplicate=False)}
    head = lm.get_output_embeddings()
    if head is not None and head.weight is lm.get_input_embeddings().weight:
        raise CheckpointError("the language model ties its embeddings; the original used LLaMA")
    head_name = names[id(head.weight)] if head is not None else None
    return names[id(lm.get_input_embeddings().weight)], head_name


def map_state(
    state: dict[str, torch.Tensor], model: VisualChatModel, index: torch.Tensor, projector: str
) -> dict[str, torch.Tensor]:
    """Original key names -> `VisualChatModel` names, vocabulary rows re-indexed."""
    proj_prefix = "mm_projector.projection." if projector == "linear" else "mm_projector."
    prefixes = {"lang_decoder.": "language_model.", "vis_encoder.": VISION_PREFIX}
    prefixes["projection."] = proj_prefix
    vision_keys = {k for k in model.state_dict() if k.startswith(VISION_PREFIX)}
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith(DROPPED_SUFFIXES) or key == "lang_embed.weight":
            continue
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            raise CheckpointError(f"unexpected key {key!r} in the original checkpoint")
        name = prefixes[prefix] + key.removeprefix(prefix)
        if name not in vision_keys and name.startswith(LEGACY_CLIP_PREFIX):
            # transformers < 5 nested CLIPVisionModel weights under `vision_model.`
            name = VISION_PREFIX + name.removeprefix(LEGACY_CLIP_PREFIX)
        mapped[name] = tensor
    embed_name, head_name = _embedding_names(model)
    rows = state["lang_embed.weight"].shape[0]
    if int(index.max()) >= rows:
        raise CheckpointError(f"the original tokenizer names row {int(index.max())} of {rows}")
    mapped[f"language_model.{embed_name}"] = state["lang_embed.weight"][index]
    if head_name is not None:
        head = f"language_model.{head_name}"
        if head in mapped:
            mapped[head] = mapped[head][index]
    return mapped


def check_keys(mapped: dict[str, torch.Tensor], model: VisualChatModel, source: Path) -> None:
    """Every model key present with its shape, nothing extra; else a CheckpointError."""
    problems = key_mismatches(model, mapped, examples=3)
    if problems:
        raise CheckpointError(
            f"{source} does not match --lm/--vision/--projector: {'; '.join(problems)}; pass the "
            "base models and projector the checkpoint was trained with"
        )
