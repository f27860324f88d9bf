"""Builds the whole model from the `model:` / `trainable:` / `lora:` config sections.

The only place that calls `from_pretrained` for the language model and tokenizer (vision
folders are read by `vision_loader.py`, called from here). Local folders only: a missing file
raises CheckpointError naming it. Under ZeRO-3 the caller passes the DeepSpeed config so that
weights are partitioned while they load (HfDeepSpeedConfig must be alive during from_pretrained).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from dsvl_cli.config import Config, LoraSettings, ModelConfig
from dsvl_cli.data.template import IMAGE_TOKEN
from dsvl_cli.errors import CheckpointError, ConfigError
from dsvl_cli.log import get_logger
from dsvl_cli.model.hf_compat import enable_activation_checkpointing
from dsvl_cli.model.lm_support import (
    attention_implementation,
    check_language_model,
    refuse_attention,
)
from dsvl_cli.model.mmca import MMCA_ATTN_NAME, register_mmca
from dsvl_cli.model.projector import build_projector
from dsvl_cli.model.trainable import adapted_modules, block_linear_names, set_trainable
from dsvl_cli.model.vision import ImageTransform
from dsvl_cli.model.vision_loader import load_vision_encoder
from dsvl_cli.model.vlm import NewTokenEmbedding, VisualChatModel

log = get_logger(__name__)
hf_logging.disable_progress_bar()  # dsvl shows its own progress; no per-file loading bars

# PEFT target modules per part when `lora.<part>.target_modules` is null. The LM: PEFT's
# "all-linear" (every Linear layer but the output head), which resolves per architecture: LLaMA's
# q/k/v/o and gate/up/down projections, Phi3's fused qkv_proj and gate_up_proj, ...
LM_LORA_TARGETS = "all-linear"
# nn.MultiheadAttention reads its out_proj weight directly (LoRA there would do nothing), so
# open_clip adapts the MLPs and qwen_vit its ViT blocks' plain Linear layers only.
VISION_LORA_TARGETS: dict[str, list[str] | str] = {
    "clip": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "open_clip": ["c_fc", "c_proj"],
    "qwen_vit": r".*resblocks\.\d+\.(attn\.in_proj|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)",
}


@dataclass
class Built:
    """What the builder returns: the model, its tokenizer, and the image transform."""

    model: VisualChatModel
    tokenizer: PreTrainedTokenizerBase
    image_transform: ImageTransform
    image_processor: Any
    ds_config_handle: Any = None  # keeps HfDeepSpeedConfig alive under ZeRO-3


def _require_folder(path: str, what: str, needs: tuple[str, ...]) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{what} folder {folder} does not exist; set it in the recipe")
    for name in needs:
        if not (folder / name).exists():
            raise CheckpointError(
                f"{what} folder {folder} has no {name}; save the model there with "
                "save_pretrained (or download it with huggingface-cli download ... --local-dir)"
            )
    return folder


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The LM's tokenizer with `<image>` added as a special token; pad = EOS if it has none."""
    folder = _require_folder(path, "language model", ("tokenizer_config.json",))
    tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=True)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # as the original: no extra embedding row
    tokenizer.padding_side = "right"
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer in {folder} has no BOS or EOS token; dsvl needs both")
    return tokenizer


def load_language_model(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype
) -> nn.Module:
    """The causal LM, embeddings resized for the new tokens.

    Attention: MMCA, or with MMCA off `model.attn_implementation` or the LM's best supported
    (`lm_support.attention_implementation`). An LM feature MMCA cannot run is refused first.
    """
    folder = _require_folder(cfg.language_model, "language model", ("config.json",))
    check_language_model(cfg)
    if cfg.mmca.enabled:
        register_mmca()
    attn = attention_implementation(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn)
    except (ValueError, ImportError) as err:
        if attn is None or attn == MMCA_ATTN_NAME:
            raise
        raise refuse_attention(cfg, err) from None
    model.config.mmca_image_attends_text = cfg.mmca.image_attends_text
    if model.config.max_position_embeddings < cfg.max_seq_len:
        log.warning(
            "model.max_seq_len %d exceeds the LM's max_position_embeddings %d",
            cfg.max_seq_len,
            model.config.max_position_embeddings,
        )
    old = model.get_input_embeddings().num_embeddings
    if len(tokenizer) != old:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        _mean_init_new_rows(model, old)
    return model


def _mean_init_new_rows(model: nn.Module, old: int) -> None:
    """Set added embedding / LM-head rows to the mean of the old rows.

    Deterministic on purpose: exports do not store frozen rows, so every rebuild must recreate
    them bit for bit (transformers' default samples them at random).
    """
    tables = {model.get_input_embeddings().weight, model.get_output_embeddings().weight}
    partitioned = [t for t in tables if hasattr(t, "ds_id")]
    context = contextlib.nullcontext()
    if partitioned:
        import deepspeed

        context = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)
    with context, torch.no_grad():
        for weight in tables:
            weight[old:] = weight[:old].mean(dim=0, keepdim=True)


def build_model(
    config: Config,
    dtype: torch.dtype = torch.float32,
    ds_config: dict[str, Any] | None = None,
    training: bool = False,
) -> Built:
    """Build tokenizer, vision encoder, projector and LM, then apply the trainable policy.

    `training`: also enable `train.gradient_checkpointing` (when set) before the trainable set is
    decided, so that the model comes back ready to train.
    """
    handle = None
    if ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        handle = HfDeepSpeedConfig(ds_config)  # must outlive from_pretrained
    cfg = config.model
    tokenizer = load_tokenizer(cfg.language_model)
    base_vocab = _base_vocab(cfg.language_model)
    lm = load_language_model(cfg, tokenizer, dtype)
    vision, transform = load_vision_encoder(
        cfg.vision.kind, cfg.vision.path, cfg.vision.open_clip_model, dtype=dtype
    )
    projector = _new_projector(config, vision, lm, dtype)
    model = VisualChatModel(
        vision,
        projector,
        lm,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        mmca=cfg.mmca.enabled,
        image_attends_text=cfg.mmca.image_attends_text,
        mmca_impl=cfg.mmca.impl,
    )
    checkpointing = training and config.train.gradient_checkpointing
    num_new = len(tokenizer) - base_vocab
    apply_trainable(model, config, base_vocab, num_new, gradient_checkpointing=checkpointing)
    return Built(model, tokenizer, transform, vision.image_processor, handle)


def _new_projector(
    config: Config, vision: nn.Module, lm: nn.Module, dtype: torch.dtype
) -> nn.Module:
    """The projector, initialised from `train.seed` alone.

    Deterministic on purpose, like the new embedding rows: an export stores only trained
    tensors, so a frozen projector (`trainable.projector: false`) must come back bit for bit
    when the export is rebuilt; the global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        projector = build_projector(
            config.model.projector,
            vision_hidden=vision.hidden_size,
            lm_hidden=lm.config.get_text_config().hidden_size,
            vision_tokens=vision.num_tokens,
            vision_config=vision.layer_config,
        )
    return projector.to(dtype)


def _base_vocab(path: str) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(path).get_text_config().vocab_size)


def apply_trainable(
    model: VisualChatModel,
    config: Config,
    base_vocab: int,
    num_new: int,
    gradient_checkpointing: bool = False,
) -> None:
    """Apply the wrappers `trainable:` asks for, then decide the trainable set once.

    LoRA first, so that a `NewTokenEmbedding` wraps the LM's table as the LM will use it; which
    parameters train is then set (and checked) by `trainable.set_trainable`, never left to a
    wrapper (PEFT's injection re-freezes every non-LoRA weight of the part it adapts).
    """
    parts = config.trainable
    lora_parts = {
        "language_model": (parts.language_model == "lora", config.lora.language_model),
        "vision": (parts.vision == "lora", config.lora.vision),
    }
    for part, (enabled, settings) in lora_parts.items():
        if enabled:
            _add_lora(model, part, settings, config.model.vision.kind)
    if parts.embeddings == "new_tokens" and num_new > 0:
        table = model.language_model.get_input_embeddings()
        model.set_token_embedding(NewTokenEmbedding(table, base_vocab, num_new))
    elif parts.embeddings == "new_tokens":
        log.warning(
            "trainable.embeddings=new_tokens: the tokenizer added no token to the LM's "
            "vocabulary, so no embedding row trains; set trainable.embeddings=frozen to say so"
        )
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    set_trainable(model, config)


def enable_gradient_checkpointing(model: VisualChatModel) -> None:
    """Recompute the LM's and the vision encoder's blocks in backward (non-reentrant)."""
    enable_activation_checkpointing(model.language_model, use_reentrant=False)
    model.vision.gradient_checkpointing_enable()


def _add_lora(model: VisualChatModel, part: str, settings: LoraSettings, vision_kind: str) -> None:
    """Inject a PEFT LoRA adapter named after the part into that submodule, in place.

    `requires_grad` is left as PEFT sets it; `apply_trainable` decides it afterwards.
    """
    from peft import LoraConfig, inject_adapter_in_model

    targets: list[str] | str = settings.target_modules or (
        LM_LORA_TARGETS if part == "language_model" else VISION_LORA_TARGETS[vision_kind]
    )
    lora = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
    )
    submodule = getattr(model, part)
    linear = sorted(block_linear_names(submodule))
    names = f"its blocks' linear layers are {', '.join(linear)}" if linear else "name its layers"
    try:
        inject_adapter_in_model(lora, submodule, adapter_name=part)
    except ValueError as err:  # PEFT's NoMatchingPeftModuleError is a ValueError
        reason = str(err).split(". ")[0]
        raise ConfigError(
            f"lora.{part}.target_modules {targets} do not fit the {part} ({reason}); {names} "
            "(null: the default)"
        ) from None
    adapted = adapted_modules(submodule)
    if not adapted:
        raise ConfigError(
            f"lora.{part}.target_modules {targets} matched no layer of the {part}; {names} "
            "(null: the default)"
        )
    missed = sorted(set(linear) - set(adapted))
    if part == "language_model" and missed:
        log.warning(
            "lora.language_model.target_modules %s adapt %s but not %s of the decoder blocks; "
            "target_modules: null adapts every linear layer",
            targets,
            ", ".join(adapted),
            ", ".join(missed),
        )
