"""The Qwen-VL visual tower (ViT-bigG/14 + 256-query resampler), without its final `proj`.

A re-implementation of `transformer.visual` from Qwen-VL(-Chat) `visual.py`, as DeepSpeed-VisualChat
uses it: the output is `ln_post(attn_pool(vit(x)))`, `[N, n_queries, output_dim]`; the 4096x4096
`proj` matmul after `ln_post` is dropped on purpose, as the original DSVL does.

Parameter names equal the Qwen-VL checkpoint keys with the prefix `transformer.visual.` stripped and
`transformer.visual.proj` dropped, so a state dict written by `dsvl extract-qwen` loads with
`strict=True`. For `layers` blocks (i = 0 .. layers-1) the keys are::

    conv1.weight                                   [width, 3, patch, patch]   (no bias)
    positional_embedding                           [pos_grid**2, width]       (256 rows in Qwen-VL)
    ln_pre.{weight,bias}
    transformer.resblocks.{i}.ln_1.{weight,bias}
    transformer.resblocks.{i}.attn.in_proj.{weight,bias}   [3*width, width], [3*width]
    transformer.resblocks.{i}.attn.out_proj.{weight,bias}
    transformer.resblocks.{i}.ln_2.{weight,bias}
    transformer.resblocks.{i}.mlp.c_fc.{weight,bias}       [mlp_size, width]
    transformer.resblocks.{i}.mlp.c_proj.{weight,bias}     [width, mlp_size]
    attn_pool.query                                [n_queries, output_dim]
    attn_pool.pos_embed                            [n_queries, output_dim]  (fixed sin-cos buffer)
    attn_pool.kv_proj.weight                       [output_dim, width]  (none if width==output_dim)
    attn_pool.attn.in_proj_weight, attn_pool.attn.in_proj_bias   (nn.MultiheadAttention)
    attn_pool.attn.out_proj.{weight,bias}
    attn_pool.ln_q.{weight,bias}, attn_pool.ln_kv.{weight,bias}
    ln_post.{weight,bias}

Note the two attention layouts: the ViT blocks use Qwen's own `VisualAttention`, an `nn.Linear`
named `in_proj` whose output is laid out per head as [q_h | k_h | v_h]; the resampler uses a stock
`nn.MultiheadAttention` (`in_proj_weight` laid out as [q | k | v]).

`config.json` written beside the weights (`QwenViTConfig.to_json`): a flat JSON object with
`"model_type": "dsvl_qwen_vit"` and every `QwenViTConfig` field, e.g. for Qwen-VL::

    {"model_type": "dsvl_qwen_vit", "image_size": 448, "patch_size": 14, "width": 1664,
     "layers": 48, "heads": 16, "mlp_size": 8192, "n_queries": 256, "output_dim": 4096,
     "output_heads": 32, "pos_grid": 16, "eps": 1e-06}
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import CLIPImageProcessor

from dsvl_cli.errors import CheckpointError

QWEN_VIT_MODEL_TYPE = "dsvl_qwen_vit"
# OpenAI CLIP normalisation, which Qwen-VL uses too.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _exact_sqrt(n: int, what: str) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{what} must be a square number of positions, got {n}")
    return side


def sincos_2d_table(dim: int, grid: int) -> torch.Tensor:
    """Fixed MAE-style 2-D sin-cos table, `[grid*grid, dim]` fp32, rows in row-major grid order.

    Each axis gets dim/2 channels (half sin, half cos) with frequencies 1/10000^(2k/(dim/2)); the
    first half of the channels encodes the column coordinate (MAE's meshgrid puts w first).
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos table needs a dimension divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def axis(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([axis(cols), axis(rows)], dim=1).float()


def resize_pos_table(table: torch.Tensor, num_positions: int) -> torch.Tensor:
    """Resize a square position table `[S*S, C]` to `[num_positions, C]` (a square grid).

    Bicubic, align_corners False, computed in fp32 and cast back, as Qwen-VL's `get_abs_pos`.
    """
    src = _exact_sqrt(table.shape[0], "a position table")
    tgt = _exact_sqrt(num_positions, "the target grid")
    if src == tgt:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(tgt * tgt, -1).to(table.dtype)


@dataclass
class QwenViTConfig:
    """Architecture of the Qwen-VL visual tower; defaults are Qwen-VL(-Chat)'s."""

    image_size: int = 448
    patch_size: int = 14
    width: int = 1664
    layers: int = 48
    heads: int = 16
    mlp_size: int = 8192
    n_queries: int = 256
    output_dim: int = 4096
    output_heads: int = 32
    pos_grid: int = 16  # positional_embedding has pos_grid**2 rows, resized to the patch grid
    eps: float = 1e-6

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def to_json(self, path: str | Path) -> None:
        """Write `config.json` (flat object with `model_type` and every field)."""
        payload = {"model_type": QWEN_VIT_MODEL_TYPE, **asdict(self)}
        Path(path).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_json(cls, path: str | Path) -> QwenViTConfig:
        """Read a `config.json` written by `to_json`; unknown or missing fields are errors."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        model_type = data.pop("model_type", None)
        if model_type != QWEN_VIT_MODEL_TYPE:
            raise CheckpointError(
                f"{path} has model_type {model_type!r}, not {QWEN_VIT_MODEL_TYPE!r}; "
                "write qwen_vit folders with 'dsvl extract-qwen'"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"{path} has unknown qwen_vit config fields {unknown}")
        return cls(**data)

    def image_processor(self) -> CLIPImageProcessor:
        """DSVL's preprocessing for this tower: bicubic resize, centre crop, CLIP mean/std."""
        side = self.image_size
        return CLIPImageProcessor(
            size={"shortest_edge": side},
            crop_size={"height": side, "width": side},
            resample=3,
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
        )


class VisualAttention(nn.Module):
    """Qwen-VL self-attention: fused `in_proj` (per-head [q|k|v] layout) and `out_proj`."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        qkv = self.in_proj(x).view(n, length, self.heads, 3, width // self.heads)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [N, heads, L, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))


class VisualBlock(nn.Module):
    """Pre-LN residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) with exact GELU."""

    def __init__(self, width: int, heads: int, mlp_size: int, eps: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = VisualAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(width, mlp_size),
                gelu=nn.GELU(),
                c_proj=nn.Linear(mlp_size, width),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisualTransformer(nn.Module):
    """The stack of blocks (`resblocks`), with optional per-block gradient checkpointing."""

    def __init__(self, config: QwenViTConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            VisualBlock(config.width, config.heads, config.mlp_size, config.eps)
            for _ in range(config.layers)
        )
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.resblocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        return x


class Resampler(nn.Module):
    """Cross-attention of learned queries over a patch grid (Qwen-VL `attn_pool`, DSVL perceiver).

    query = ln_q(query) + pos_embed, key = ln_kv(kv_proj(x)) + pos_embed resized to the patch grid,
    value = ln_kv(kv_proj(x)); `pos_embed` is a fixed 2-D sin-cos table kept as a persistent
    buffer, so it loads from checkpoints that carry it but is never trained.
    Input `[N, grid*grid, kv_dim]`, output `[N, n_queries, embed_dim]`.
    """

    def __init__(
        self,
        n_queries: int,
        embed_dim: int,
        num_heads: int,
        kv_dim: int | None,
        kv_bias: bool,
        eps: float,
    ) -> None:
        super().__init__()
        grid = _exact_sqrt(n_queries, "the number of resampler queries")
        self.register_buffer("pos_embed", sincos_2d_table(embed_dim, grid), persistent=True)
        self.query = nn.Parameter(torch.zeros(n_queries, embed_dim))
        # kv_dim None: the input already has embed_dim channels (Qwen-VL then uses an Identity).
        self.kv_proj = (
            nn.Identity() if kv_dim is None else nn.Linear(kv_dim, embed_dim, bias=kv_bias)
        )
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(embed_dim, eps=eps)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=eps)
        self.apply(init_resampler_weights)
        nn.init.trunc_normal_(self.query, std=0.02)

    @property
    def num_queries(self) -> int:
        return self.query.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.ln_kv(self.kv_proj(x))
        key_pos = resize_pos_table(self.pos_embed, kv.shape[1])
        query = (self.ln_q(self.query) + self.pos_embed).expand(kv.shape[0], -1, -1)
        out, _ = self.attn(query, kv + key_pos, kv, need_weights=False)
        return out


def init_resampler_weights(module: nn.Module) -> None:
    # The original's `_init_weights`: trunc-normal 0.02 Linear weights (incl. the attention's
    # out_proj), zero biases, unit LayerNorms; the attention's in_proj keeps torch's init.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class QwenViT(nn.Module):
    """Qwen-VL visual tower minus `proj`: pixels `[N,3,S,S]` -> `[N, n_queries, output_dim]`."""

    def __init__(self, config: QwenViTConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.conv1 = nn.Conv2d(3, width, config.patch_size, stride=config.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(
            width**-0.5 * torch.randn(config.pos_grid**2, width)
        )
        self.ln_pre = nn.LayerNorm(width, eps=config.eps)
        self.transformer = VisualTransformer(config)
        self.attn_pool = Resampler(
            n_queries=config.n_queries,
            embed_dim=config.output_dim,
            num_heads=config.output_heads,
            kv_dim=None if width == config.output_dim else width,
            kv_bias=False,
            eps=config.eps,
        )
        self.ln_post = nn.LayerNorm(config.output_dim, eps=config.eps)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each block in backward (only in training mode with grad enabled)."""
        self.transformer.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.transformer.gradient_checkpointing = False

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.to(dtype=self.conv1.weight.dtype, device=self.conv1.weight.device)
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [N, grid*grid, width], row-major
        x = x + resize_pos_table(self.positional_embedding, x.shape[1])
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(self.attn_pool(x))
