"""Per-GPU memory estimate for `dsvl train --dry-run`, without loading any weights.

Parameter counts are exact: the model is built on PyTorch's `meta` device (shapes, no storage)
from the LM's `config.json` (+ tokenizer length) and the vision config, through the builder's own
projector and trainable-policy code, so LoRA, `new_tokens` and every projector kind count as they
will train. A missing folder or config makes that part "unknown (why)"; the rest is still counted
and the bytes are then a lower bound (said in the notes).

Bytes per GPU, for N parameters (T trainable), W ranks, p bytes per element (2 bf16/fp16, 4 fp32):
weights N*p (ZeRO-3: N*p/W plus a gathered working set of at most `stage3_max_live_parameters`;
parameter offload moves the partition to the CPU); gradients T*p (/W from ZeRO-2); optimizer
states 8 bytes per trainable parameter (Adam's two fp32 moments) plus a 4-byte fp32 master copy
under mixed precision (/W from ZeRO-1; optimizer offload moves them to the CPU, reported per
process).

Activations (an estimate) for one micro-batch of b samples x s = `model.max_seq_len` tokens, in
the spirit of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models"), counted in elements for a LLaMA-style layer of hidden h and MLP width I: 2sbh (RMSNorm
in/out) + 4sbh (q, k, v, attention output) + sbh (o_proj input) + 2sbh (second norm) + 4sbI
(SwiGLU gate, up, SiLU out, product) = sb(9h + 4I). The paper's 5as^2b score term is dropped:
SDPA/flash and FlexAttention recompute scores. MMCA's second branch adds sbh per layer; its dense
masks add 2bs^2 bytes per forward. With gradient checkpointing a layer keeps only its input (sbh)
plus one layer's full activations during recompute. Logits exist for supervised positions only
(`SUPERVISED_FRACTION` assumed): half-precision logits, fp32 copy, fp32 gradient. A vision tower
counts only when it trains (same formula, an over-estimate for its GELU MLP). Not included: CUDA
context, allocator fragmentation, communication buffers.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch import nn

from dsvl_cli.config import Config, VisionConfig
from dsvl_cli.errors import CheckpointError
from dsvl_cli.train.engine import STAGE3_MAX_LIVE_PARAMETERS

GIB = 1024**3
SUPERVISED_FRACTION = 0.25  # share of a sequence's tokens that carry a label (answers + EOS)
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


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated bytes per GPU (and per process on the CPU) for one training configuration."""

    world_size: int
    zero_stage: int
    precision: str
    parts: tuple[PartCount, ...]
    weights: int
    gradients: int
    optimizer: int
    activations: int
    cpu: int
    notes: tuple[str, ...] = ()

    @property
    def gpu_total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def complete(self) -> bool:
        """False when some part could not be counted (the bytes are then a lower bound)."""
        return all(p.total is not None and p.trainable is not None for p in self.parts)

    @property
    def total_params(self) -> int:
        return sum(p.total or 0 for p in self.parts)

    @property
    def trainable_params(self) -> int:
        return sum(p.trainable or 0 for p in self.parts)

    def _param_rows(self) -> list[tuple[str, str, str]]:
        rows = [
            (p.name, _count(p.total), _count(p.trainable))
            if p.total is not None
            else (p.name, p.note, "")
            for p in self.parts
        ]
        return [*rows, ("all parts", _count(self.total_params), _count(self.trainable_params))]

    def _byte_rows(self) -> list[tuple[str, str]]:
        rows = [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer states", self.optimizer),
            ("activations", self.activations),
            ("total per GPU", self.gpu_total),
            ("CPU per process (offload)", self.cpu),
        ]
        return [(name, f"{value / GIB:.1f} GiB") for name, value in rows]

    def all_notes(self) -> list[str]:
        """Notes on what the numbers assume, and whether they are a lower bound."""
        bound = [] if self.complete else ["some parts are unknown: the bytes are a lower bound"]
        return (
            bound + [p.note for p in self.parts if p.total is not None and p.note] + [*self.notes]
        )

    def title(self) -> str:
        return (
            f"memory estimate (ZeRO-{self.zero_stage}, {self.precision}, {self.world_size} GPU(s))"
        )

    def lines(self) -> list[str]:
        """Plain-text rendering: parameters per part, then GiB (one decimal), then notes."""
        out = [f"{self.title()}:"]
        for name, total, train in self._param_rows():
            out.append(
                f"  {name}: {total} params, {train} trainable" if train else f"  {name}: {total}"
            )
        out += [f"  {name}: {value}" for name, value in self._byte_rows()]
        return out + [f"  note: {note}" for note in self.all_notes()]

    def table(self) -> Table:
        """Rich rendering of `lines()`: parameter counts per part, then bytes; notes as caption."""
        caption = "\n".join(self.all_notes())
        table = Table(
            title=self.title(), title_justify="left", caption=caption, caption_justify="left"
        )
        for column in ("item", "params / bytes", "trainable"):
            table.add_column(column, justify="left" if column == "item" else "right")
        for row in self._param_rows():
            table.add_row(*row)
        table.add_section()
        for name, value in self._byte_rows():
            table.add_row(name, value, "")
        return table


def _count(n: int | None) -> str:
    if n is None:
        return "unknown"
    for scale, unit, digits in ((1e9, "B", 2), (1e6, "M", 1), (1e3, "K", 1)):
        if n >= scale:
            return f"{n / scale:.{digits}f}{unit}"
    return str(n)


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


def _meta_language_model(path: str) -> tuple[nn.Module, LayerShape, str]:
    """The LM on meta, resized to the tokenizer as the builder does; its shape; a note."""
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
        model = AutoModelForCausalLM.from_config(lm_config, attn_implementation="sdpa")
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


def _alone(name: str, module: nn.Module, mode: str, embeddings: int = 0) -> PartCount:
    """One part counted without the rest of the model (the other folder is missing)."""
    total = sum(p.numel() for p in module.parameters())
    trainable = {"frozen": embeddings, "full": total}.get(mode)
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
    table = lm.get_input_embeddings().weight.numel() if embeddings == "full" else 0
    found.parts.append(_alone("language_model", lm, config.trainable.language_model, table))
    new_rows = (found.lm.vocab - found.lm.base_vocab) * found.lm.hidden
    if embeddings == "new_tokens" and new_rows > 0:
        found.parts.append(PartCount("token_embed", new_rows, new_rows))


def count_parameters(config: Config) -> ModelCount:
    """Exact per-part counts from the configs on the meta device (no weights read)."""
    found = ModelCount(parts=[])
    lm = encoder = None
    reasons: dict[str, str] = {}
    try:
        lm, found.lm, note = _meta_language_model(config.model.language_model)
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


# ----------------------------------------------------------------------------- bytes


def _state_bytes(config: Config, world: int, total: int, trainable: int) -> tuple[int, ...]:
    """(GPU weights, GPU gradients, GPU optimizer states, CPU bytes) per rank."""
    dist = config.distributed
    stage, half = dist.zero_stage, dist.precision in ("bf16", "fp16")
    p = 2 if half else 4
    weights, cpu = total * p, 0
    if stage == 3:
        gathered = min(total, STAGE3_MAX_LIVE_PARAMETERS) * p
        partition = math.ceil(weights / world)
        weights = gathered if dist.offload_params else partition + gathered
        cpu += partition if dist.offload_params else 0
    gradients = trainable * p
    gradients = math.ceil(gradients / world) if stage >= 2 else gradients
    optimizer = trainable * (8 + (4 if half else 0))
    optimizer = math.ceil(optimizer / world) if stage >= 1 else optimizer
    if dist.offload_optimizer:
        cpu, optimizer = cpu + optimizer, 0
    return weights, gradients, optimizer, cpu


def _stack_elements(shape: LayerShape, tokens: int, checkpointing: bool, extra: int = 0) -> int:
    """Activation elements of a transformer stack over `tokens` tokens (see the module doc)."""
    per_layer = tokens * (9 * shape.hidden + 4 * shape.intermediate + extra * shape.hidden)
    if checkpointing:
        return shape.layers * tokens * shape.hidden + per_layer
    return shape.layers * per_layer


def activation_bytes(config: Config, lm: LayerShape | None, vision: LayerShape | None) -> int:
    """Activation bytes of one micro-batch at `model.max_seq_len` tokens (an estimate)."""
    model, train = config.model, config.train
    p = 2 if config.distributed.precision in ("bf16", "fp16") else 4
    seq, batch = model.max_seq_len, train.micro_batch_size
    total = 0
    if lm is not None:
        mmca = 1 if model.mmca.enabled else 0
        elements = _stack_elements(lm, seq * batch, train.gradient_checkpointing, mmca)
        elements += 2 * seq * batch * lm.hidden  # embeddings out, final norm
        supervised = math.ceil(SUPERVISED_FRACTION * seq * batch)
        total += elements * p + supervised * lm.vocab * (p + 8)
        if model.mmca.enabled and model.mmca.impl == "dense":
            total += 2 * batch * seq * seq
    if vision is not None and config.trainable.vision != "frozen":
        images = batch * model.max_images_per_sample
        tokens = images * vision.tokens
        total += _stack_elements(vision, tokens, train.gradient_checkpointing) * p
    return total


def estimate_memory(config: Config, world_size: int) -> MemoryEstimate:
    """Estimate per-GPU memory of training `config` on `world_size` GPUs (no weights loaded)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    found = count_parameters(config)
    total = sum(p.total or 0 for p in found.parts)
    trainable = sum(p.trainable or 0 for p in found.parts)
    weights, gradients, optimizer, cpu = _state_bytes(config, world_size, total, trainable)
    activations = activation_bytes(config, found.lm, found.vision)
    notes = [*found.notes]
    notes.append(
        f"activations assume micro-batches of {config.model.max_seq_len} tokens and "
        f"{SUPERVISED_FRACTION:.0%} supervised tokens; CUDA context and fragmentation not included"
    )
    dist = config.distributed
    return MemoryEstimate(
        world_size=world_size,
        zero_stage=dist.zero_stage,
        precision=dist.precision,
        parts=tuple(found.parts),
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        cpu=cpu,
        notes=tuple(notes),
    )
