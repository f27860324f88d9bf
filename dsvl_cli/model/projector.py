"""Projectors from vision features `[N, T, Dv]` to LM-width image tokens `[N, T', Dl]`.

Kinds (the original's projector choices):

* `linear` (the original's "baseline"): Linear(Dv->Dl) + LayerNorm(Dl, eps 1e-12) per token.
* `mlp`: Linear(Dv->Dl), GELU, Linear(Dl->Dl) per token (LLaVA-1.5's mlp2x_gelu).
* `vit`: one freshly initialised pre-LN transformer layer on the vision tokens, then the `linear`
  head. The layer is HF `CLIPEncoderLayer(layer_config)`: for `clip` the encoder's own config, for
  other kinds a config at the encoder's output width (`VisionEncoder.layer_config`).
* `perceiver`: CLS dropped when present, then a resampler of learned queries over the patch grid
  (`qwen_vit.Resampler` with a biased kv_proj and eps 1e-12), then LayerNorm(1e-12) + Linear.
  Its sin-cos table is a buffer, never trained (the original trained it by accident).

Submodule names follow the original (`projection.*`, `vis_layer.*`, `query`, `pos_embed`,
`kv_proj`, `attn`, `ln_q`, `ln_kv`) so its projection weights map over one to one.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod

import torch
from torch import nn
from transformers import CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from dsvl_cli.errors import ConfigError
from dsvl_cli.model.qwen_vit import Resampler, init_resampler_weights

PROJECTOR_KINDS = ("linear", "mlp", "vit", "perceiver")
HEAD_LN_EPS = 1e-12


class Projector(nn.Module, ABC):
    """Maps `[N, T, Dv]` to `[N, num_tokens, Dl]`."""

    num_tokens: int

    @abstractmethod
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Project one batch of vision features."""


def _linear_head(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim, eps=HEAD_LN_EPS))


class LinearProjector(Projector):
    """Per-token Linear + LayerNorm(1e-12); PyTorch default initialisation."""

    def __init__(self, vision_hidden: int, lm_hidden: int, vision_tokens: int) -> None:
        super().__init__()
        self.projection = _linear_head(vision_hidden, lm_hidden)
        self.num_tokens = vision_tokens

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projection(features)


class MlpProjector(Projector):
    """Per-token two-layer GELU MLP."""

    def __init__(self, vision_hidden: int, lm_hidden: int, vision_tokens: int) -> None:
        super().__init__()
        self.projection = nn.Sequential(
            nn.Linear(vision_hidden, lm_hidden), nn.GELU(), nn.Linear(lm_hidden, lm_hidden)
        )
        self.num_tokens = vision_tokens

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projection(features)


class VitProjector(Projector):
    """A fresh `CLIPEncoderLayer` over all vision tokens, then Linear + LayerNorm(1e-12)."""

    def __init__(self, layer_config: CLIPVisionConfig, lm_hidden: int, vision_tokens: int) -> None:
        super().__init__()
        config = copy.deepcopy(layer_config)
        # Standalone layer: pick the attention kernel here instead of inheriting the encoder's.
        config._attn_implementation = "sdpa"
        self.vis_layer = CLIPEncoderLayer(config)
        self.projection = _linear_head(config.hidden_size, lm_hidden)
        self.num_tokens = vision_tokens

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projection(self.vis_layer(features, attention_mask=None))


class PerceiverProjector(Resampler, Projector):
    """Learned queries cross-attending to the patch grid, then LayerNorm(1e-12) + Linear."""

    def __init__(
        self,
        vision_hidden: int,
        lm_hidden: int,
        vision_tokens: int,
        num_queries: int | None = None,
    ) -> None:
        grid, has_cls = _patch_grid(vision_tokens)
        n_queries = grid * grid if num_queries is None else num_queries
        if math.isqrt(n_queries) ** 2 != n_queries:
            raise ConfigError(
                f"projector.num_queries must be a square number (a query grid), got {n_queries}"
            )
        super().__init__(
            n_queries=n_queries,
            embed_dim=lm_hidden,
            num_heads=_perceiver_heads(lm_hidden),
            kv_dim=vision_hidden,
            kv_bias=True,
            eps=HEAD_LN_EPS,
        )
        self.projection = nn.Sequential(
            nn.LayerNorm(lm_hidden, eps=HEAD_LN_EPS), nn.Linear(lm_hidden, lm_hidden)
        )
        self.projection.apply(init_resampler_weights)
        self.drop_cls = has_cls
        self.num_tokens = n_queries

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        patches = features[:, 1:] if self.drop_cls else features
        return self.projection(super().forward(patches))


def _patch_grid(vision_tokens: int) -> tuple[int, bool]:
    """(grid side, has CLS) for T = grid^2 (no CLS) or T = grid^2 + 1 (CLS first)."""
    for has_cls in (False, True):
        patches = vision_tokens - int(has_cls)
        side = math.isqrt(max(patches, 0))
        if patches > 0 and side * side == patches:
            return side, has_cls
    raise ConfigError(
        f"the perceiver projector needs a square patch grid (optionally plus a CLS token); "
        f"the vision encoder gives {vision_tokens} tokens: choose projector.kind linear, mlp or vit"
    )


def _perceiver_heads(lm_hidden: int) -> int:
    # The original uses lm_hidden // 128 (32 heads at 4096); take the largest head count not
    # above that which divides lm_hidden, so small test widths still work.
    heads = max(1, lm_hidden // 128)
    while lm_hidden % heads:
        heads -= 1
    return heads


def _default_layer_config(vision_hidden: int) -> CLIPVisionConfig:
    heads = max(1, vision_hidden // 64)
    while vision_hidden % heads:
        heads -= 1
    return CLIPVisionConfig(
        hidden_size=vision_hidden,
        num_attention_heads=heads,
        intermediate_size=4 * vision_hidden,
        hidden_act="gelu",
    )


def build_projector(
    kind: str,
    vision_hidden: int,
    lm_hidden: int,
    vision_tokens: int,
    vision_config: CLIPVisionConfig | None = None,
    num_queries: int | None = None,
) -> Projector:
    """Build the projector `kind` for an encoder giving `vision_tokens` x `vision_hidden` features.

    `vision_config` is the `vit` layer's config (pass `VisionEncoder.layer_config`; without it a
    layer with 64-wide heads and a 4x GELU MLP is built). `num_queries` applies to `perceiver` only
    (default: one query per patch).
    """
    if num_queries is not None and kind != "perceiver":
        raise ConfigError(f"projector.num_queries applies to kind 'perceiver' only, not {kind!r}")
    if kind == "linear":
        return LinearProjector(vision_hidden, lm_hidden, vision_tokens)
    if kind == "mlp":
        return MlpProjector(vision_hidden, lm_hidden, vision_tokens)
    if kind == "vit":
        config = vision_config or _default_layer_config(vision_hidden)
        if config.hidden_size != vision_hidden:
            raise ValueError(
                f"vit layer config has hidden_size {config.hidden_size}, "
                f"features have {vision_hidden}"
            )
        return VitProjector(config, lm_hidden, vision_tokens)
    if kind == "perceiver":
        return PerceiverProjector(vision_hidden, lm_hidden, vision_tokens, num_queries)
    raise ConfigError(
        f"unknown projector.kind {kind!r}; choose one of {', '.join(PROJECTOR_KINDS)}"
    )
