"""Exact parameter counts per model part from configs alone, on PyTorch's `meta` device.

The model is built with shapes but no storage from the LM's `config.json` (+ tokenizer length)
and the vision config, through the builder's own projector and trainable-policy code, so LoRA,
`new_tokens` and every projector kind count as they will train. A missing folder or config makes
that part "unknown (why)"; the rest is still counted. Used by the dry-run memory estimate.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsvl_cli.config import Config, VisionConfig
from dsvl_cli.errors import CheckpointError

PARTS = ("vision", "mm_projector", "language_model", "token_embed")


@dataclass(frozen=True)
class PartCount:
    """Parameters of one top-level model part; None when the part could not be counted."""

    name: str
    total: int | None
    trainable: int | None
    note: str = ""


@dataclass(frozen=True)
class LayerShape:
    """What the activation formula needs from a transformer stack."""

    hidden: int
    intermediate: int
    layers: int
    tokens: int = 0  # tokens per image (vision towers only)
    vocab: int = 0  # language model only: rows after resizing, and before
    base_vocab: int = 0


class _Unknown(Exception):
    """A part cannot be counted; the message says why (shown as 'unknown (...)')."""


# ----------------------------------------------------------------------------- meta models


def _folder_config(path: str, what: str, read: Callable[[Path], Any]) -> tuple[Path, Any]:
    """(folder, read(folder)), or _Unknown saying what is missing or unreadable."""
    folder = Path(path)
    if not folder.is_dir():
        raise _Unknown(f"unknown ({what} folder {folder} not found)")
    if not (folder / "config.json").is_file():
        raise _Unknown(f"unknown ({what} folder {folder} has no config.json)")
    try:
        return folder, read(folder)
    except (CheckpointError, OSError, ValueError) as err:
        raise _Unknown(f"unknown ({folder / 'config.json'} unreadable: {err})") from None


def _meta_language_model(
    path: str, attn_implementation: str | None = None
) -> tuple[nn.Module, LayerShape, str]:
    """The LM on meta, resized to the tokenizer as the builder does; its shape; a note.

    `attn_implementation`: `model.attn_implementation` (None: the LM's best supported one).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from dsvl_cli.model.builder import load_tokenizer

    folder, lm_config = _folder_config(path, "language model", AutoConfig.from_pretrained)
    base_vocab = int(lm_config.get_text_config().vocab_size)
    try:
        vocab, note = len(load_tokenizer(str(folder))), ""
    except (CheckpointError, OSError, ValueError):
        vocab, note = base_vocab + 1, "no tokenizer found: assumed one added token (<image>)"
    lm_config = copy.deepcopy(lm_config)
    lm_config.get_text_config().vocab_size = vocab  # what resize_token_embeddings gives
    with torch.device("meta"):
        # The parameters do not depend on the attention; None lets transformers pick one the
        # LM supports (SDPA, else eager; a hard-wired "sdpa" fails on e.g. Gemma2).
        attn = attn_implementation
        try:
            model = AutoModelForCausalLM.from_config(lm_config, attn_implementation=attn)
        except (ValueError, ImportError) as err:
            raise _Unknown(f"unknown ({folder}: attention {attn}: {err})") from None
    text = lm_config.get_text_config()
    intermediate = getattr(text, "intermediate_size", None) or 4 * text.hidden_size
    shape = LayerShape(
        text.hidden_size, intermediate, text.num_hidden_layers, vocab=vocab, base_vocab=base_vocab
    )
    return model, shape, note


def _meta_vision(cfg: VisionConfig) -> tuple[nn.Module, LayerShape]:
    """The vision encoder wrapper on meta, and its tower's shape."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from dsvl_cli.model import vision, vision_loader
    from dsvl_cli.model.qwen_vit import QwenViT

    if cfg.kind == "open_clip":
        return _meta_open_clip(cfg)
    if cfg.kind == "qwen_vit":
        # the loader's reader: also accepts folders written by the original DSVL helper
        _, qwen = _folder_config(cfg.path, "vision encoder", vision_loader.qwen_config)
        with torch.device("meta"):
            encoder = vision.QwenVisionEncoder(QwenViT(qwen))
        return encoder, LayerShape(qwen.width, qwen.mlp_size, qwen.layers, qwen.grid_size**2)
    _, clip = _folder_config(cfg.path, "vision encoder", CLIPVisionConfig.from_pretrained)
    with torch.device("meta"):
        encoder = vision.ClipVisionEncoder(CLIPVisionModel(clip))
    shape = LayerShape(
        clip.hidden_size, clip.intermediate_size, clip.num_hidden_layers, encoder.num_tokens
    )
    return encoder, shape


def _meta_open_clip(cfg: VisionConfig) -> tuple[nn.Module, LayerShape]:
    import open_clip

    from dsvl_cli.model import vision, vision_loader

    if not cfg.open_clip_model:
        raise _Unknown("unknown (vision.open_clip_model not set)")
    name = vision_loader.open_clip_name(cfg.open_clip_model)
    # open_clip warns (root logger) that a model without weights is random: true, and beside
    # the point here (shapes only), and it would mislead a dry-run reader.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with torch.device("meta"):
            visual = open_clip.create_model(name, pretrained=None, device="meta").visual
    finally:
        logging.disable(previous)
    visual.prune_intermediate_layers(indices=1, prune_norm=True, prune_head=True)
    layer = vision_loader.open_clip_layer_config(name)
    encoder = vision.OpenClipVisionEncoder(visual, layer)
    layers = len(visual.transformer.resblocks)
    shape = LayerShape(layer.hidden_size, layer.intermediate_size, layers, encoder.num_tokens)
    return encoder, shape


def _meta_model(config: Config, encoder: nn.Module, lm: nn.Module, base_vocab: int) -> nn.Module:
    """The composite on meta with the trainable policy applied exactly as the builder does."""
    from dsvl_cli.model.builder import apply_trainable
    from dsvl_cli.model.projector import build_projector
    from dsvl_cli.model.vlm import VisualChatModel

    vocab = lm.get_input_embeddings().num_embeddings
    with torch.device("meta"):
        projector = build_projector(
            config.model.projector,
            vision_hidden=encoder.hidden_size,
            lm_hidden=lm.config.get_text_config().hidden_size,
            vision_tokens=encoder.num_tokens,
            vision_config=encoder.layer_config,
        )
        model = VisualChatModel(encoder, projector, lm, image_token_id=vocab - 1, mmca=False)
        apply_trainable(model, config, base_vocab=base_vocab, num_new=vocab - base_vocab)
    return model


def _parts_of(model: nn.Module) -> list[PartCount]:
    totals: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        row = totals.setdefault(name.split(".", 1)[0], [0, 0])
        row[0] += param.numel()
        row[1] += param.numel() if param.requires_grad else 0
    order = [p for p in PARTS if p in totals] + sorted(set(totals) - set(PARTS))
    return [PartCount(name, totals[name][0], totals[name][1]) for name in order]


def _alone(
    name: str, module: nn.Module, mode: str, table: int = 0, table_trains: bool = False
) -> PartCount:
    """One part counted without the rest of the model (the other folder is missing).

    `table`: size of the part's input embedding table, which follows `trainable.embeddings`
    rather than `mode` (`table_trains`).
    """
    total = sum(p.numel() for p in module.parameters())
    table_part = table if table_trains else 0
    trainable = {"frozen": table_part, "full": total - table + table_part}.get(mode)
    note = "LoRA not counted without both model folders" if trainable is None else ""
    return PartCount(name, total, trainable, note)


@dataclass
class ModelCount:
    """Parameter counts per part plus the shapes the activation estimate needs."""

    parts: list[PartCount]
    lm: LayerShape | None = None
    vision: LayerShape | None = None
    notes: list[str] = field(default_factory=list)


def _partial(config: Config, found: ModelCount, lm: Any, encoder: Any, reasons: dict) -> None:
    """Fill `found.parts` when one of the two model folders could not be read."""
    vision = _alone("vision", encoder, config.trainable.vision) if encoder is not None else None
    need = "unknown (needs both the language model and the vision config)"
    found.parts = [
        vision or PartCount("vision", None, None, reasons["vision"]),
        PartCount("mm_projector", None, None, need),
    ]
    if lm is None:
        found.parts.append(PartCount("language_model", None, None, reasons["language_model"]))
        return
    embeddings = config.trainable.embeddings
    table = lm.get_input_embeddings().weight.numel()
    mode = config.trainable.language_model
    found.parts.append(_alone("language_model", lm, mode, table, embeddings == "full"))
    new_rows = (found.lm.vocab - found.lm.base_vocab) * found.lm.hidden
    if embeddings == "new_tokens" and new_rows > 0:
        found.parts.append(PartCount("token_embed", new_rows, new_rows))


def count_parameters(config: Config) -> ModelCount:
    """Exact per-part counts from the configs on the meta device (no weights read)."""
    found = ModelCount(parts=[])
    lm = encoder = None
    reasons: dict[str, str] = {}
    try:
        lm, found.lm, note = _meta_language_model(
            config.model.language_model, config.model.attn_implementation
        )
        found.notes += [note] if note else []
    except _Unknown as err:
        reasons["language_model"] = str(err)
    try:
        encoder, found.vision = _meta_vision(config.model.vision)
    except _Unknown as err:
        reasons["vision"] = str(err)
    if lm is not None and encoder is not None:
        found.parts = _parts_of(_meta_model(config, encoder, lm, found.lm.base_vocab))
    else:
        _partial(config, found, lm, encoder, reasons)
    return found
