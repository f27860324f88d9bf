"""Vision encoders behind one interface: `clip` (HF CLIPVisionModel), `open_clip`, `qwen_vit`.

Every encoder maps pixels `[N, 3, H, W]` to token features `[N, T, D]` and says `num_tokens` (T),
`hidden_size` (D), `image_size`, and whether token 0 is a CLS token (`has_cls_token`). The kind is
chosen explicitly by configuration, never from a path. Loading from disk lives in
`vision_loader.py`; these classes wrap already-built modules.

`layer_config` describes one transformer layer at the encoder's output width, as a
`CLIPVisionConfig`; the `vit` projector builds its fresh layer from it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from PIL import Image
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from dsvl_cli.model.hf_compat import enable_activation_checkpointing
from dsvl_cli.model.qwen_vit import QwenViT

ImageTransform = Callable[[Image.Image], torch.Tensor]
"""A picklable callable turning one PIL image into a float tensor `[3, H, W]`."""


class HFImageTransform:
    """An `ImageTransform` backed by a Hugging Face image processor (saved with exports)."""

    def __init__(self, image_processor: CLIPImageProcessor) -> None:
        self.image_processor = image_processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        batch = self.image_processor(images=image, return_tensors="pt")
        return batch["pixel_values"][0]


class VisionEncoder(nn.Module, ABC):
    """Common interface; subclasses set the attributes below and implement the two methods."""

    kind: str
    num_tokens: int
    hidden_size: int
    image_size: int
    has_cls_token: bool
    layer_config: CLIPVisionConfig
    image_processor: CLIPImageProcessor | None = None
    # The attribute holding the plain encoder module (HF CLIPVisionModel, open_clip tower,
    # QwenViT): exported vision LoRA adapters are keyed relative to it, so plain PEFT loads them.
    wrapped: str

    @abstractmethod
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Features `[N, num_tokens, hidden_size]` for pixels `[N, 3, image_size, image_size]`."""

    @abstractmethod
    def gradient_checkpointing_enable(self) -> None:
        """Recompute the encoder's blocks in backward (useful only when the encoder trains)."""

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class ClipVisionEncoder(VisionEncoder):
    """HF `CLIPVisionModel`; features = `last_hidden_state` of the last layer, CLS included.

    No post-layernorm is applied (HF applies it to the pooled CLS only), as the original DSVL:
    openai/clip-vit-large-patch14 gives 257 tokens x 1024.
    """

    kind = "clip"
    wrapped = "model"

    def __init__(
        self, model: CLIPVisionModel, image_processor: CLIPImageProcessor | None = None
    ) -> None:
        super().__init__()
        config = model.config
        self.model = model
        self.image_size = config.image_size
        self.hidden_size = config.hidden_size
        self.num_tokens = (config.image_size // config.patch_size) ** 2 + 1
        self.has_cls_token = True
        self.layer_config = config
        self.image_processor = image_processor

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(dtype=self.dtype)
        return self.model(pixel_values=pixel_values).last_hidden_state

    def gradient_checkpointing_enable(self) -> None:
        enable_activation_checkpointing(self.model)


class OpenClipVisionEncoder(VisionEncoder):
    """The image tower (`model.visual`, a `VisionTransformer`) of an open_clip model.

    Features = the output of the last transformer block for all tokens, CLS first, with neither
    `ln_post` nor `proj` (open_clip applies both to the pooled token only). This matches the `clip`
    kind, so the same CLIP weights give the same features through either kind.
    """

    kind = "open_clip"
    wrapped = "visual"

    def __init__(self, visual: nn.Module, layer_config: CLIPVisionConfig) -> None:
        super().__init__()
        grid_h, grid_w = visual.grid_size
        self.visual = visual
        self.image_size = visual.image_size[0]
        self.hidden_size = layer_config.hidden_size
        self.num_tokens = grid_h * grid_w + 1
        self.has_cls_token = True
        self.layer_config = layer_config

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.visual.forward_intermediates(
            pixel_values.to(dtype=self.dtype),
            indices=1,  # the last block
            output_fmt="NLC",
            output_extra_tokens=True,
            intermediates_only=True,
        )
        cls_token = out["image_intermediates_prefix"][-1]
        patches = out["image_intermediates"][-1]
        return torch.cat([cls_token, patches], dim=1)

    def gradient_checkpointing_enable(self) -> None:
        self.visual.set_grad_checkpointing(True)


class QwenVisionEncoder(VisionEncoder):
    """Our Qwen-VL ViT (`qwen_vit.QwenViT`): n_queries (256) tokens x output_dim (4096), no CLS."""

    kind = "qwen_vit"
    wrapped = "model"

    def __init__(self, model: QwenViT, image_processor: CLIPImageProcessor | None = None) -> None:
        super().__init__()
        config = model.config
        self.model = model
        self.image_size = config.image_size
        self.hidden_size = config.output_dim
        self.num_tokens = config.n_queries
        self.has_cls_token = False
        # The resampler's width and heads; a 4x MLP and exact GELU as in the tower's own blocks.
        self.layer_config = CLIPVisionConfig(
            hidden_size=config.output_dim,
            num_attention_heads=config.output_heads,
            intermediate_size=4 * config.output_dim,
            hidden_act="gelu",
            layer_norm_eps=config.eps,
            image_size=config.image_size,
            patch_size=config.patch_size,
        )
        self.image_processor = image_processor

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)

    def gradient_checkpointing_enable(self) -> None:
        self.model.gradient_checkpointing_enable()
