"""Per-GPU memory estimate for `dsvl train --dry-run`, without loading any weights.

Parameter counts are exact (`param_count.py`: the model built on PyTorch's `meta` device). A
part that cannot be counted is "unknown (why)"; the bytes are then a lower bound (said in the
notes).

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

import math
from dataclasses import dataclass

from rich.table import Table

from dsvl_cli.config import Config
from dsvl_cli.train.engine import STAGE3_MAX_LIVE_PARAMETERS
from dsvl_cli.train.param_count import LayerShape, PartCount, count_parameters

GIB = 1024**3
SUPERVISED_FRACTION = 0.25  # share of a sequence's tokens that carry a label (answers + EOS)


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
