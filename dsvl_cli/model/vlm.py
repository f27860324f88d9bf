"""The composite vision-language model: vision encoder -> projector -> placed into an unmodified LM.

Shapes: B batch, L sequence (image tokens included), N images in the batch, T tokens per image
after projection, H the LM hidden size, V the vocabulary.

Image placement: tokenisation expands every image placeholder into exactly T copies
of the `<image>` id, so the model writes all projected features with one `masked_scatter`, image k
landing at the k-th run of image ids (the original reversed multi-image order, its issue #800).

Attention: with MMCA the LM runs the registered `dsvl_mmca` attention function; modality ids
(0 pad, 1 text, 2 image) cover every key position, cached ones included, and grow by one text
position per generated token (derived from the full id sequence at every generation step).
Packed rows (`data.packing`) add `sequence_ids` (1, 2, ... per conversation, 0 on pads): MMCA
masks and, with MMCA off, the LM's causal mask keep conversations apart, and position ids
restart at 0 for each conversation (derived from `sequence_ids` when not given).

Logits: always the LM's own `ForCausalLM.forward` (its head and its logit post-processing:
Gemma2's final softcapping, Granite's `logits_scaling`, Cohere's `logit_scale`), asked through
`logits_to_keep` for the positions needed only: in training those whose next token is supervised
in some row of the batch (never a full fp32 [B, L, V] tensor). `loss_sum` and `num_tokens` are
returned so the trainer can normalise by the global token count.
"""

from __future__ import annotations

import copy
from dataclasses import field, make_dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from dsvl_cli.data.template import IGNORE_INDEX
from dsvl_cli.errors import DataError
from dsvl_cli.model.hf_compat import CACHE_NAME, cache_kwargs, output_cache, packed_causal_mask
from dsvl_cli.model.mmca import IMAGE, PAD, TEXT, build_mmca_masks
from dsvl_cli.model.sequences import sequence_positions

# The cache field carries the installed transformers' name for it (hf_compat.CACHE_NAME), so
# `generate` finds it; read it with `hf_compat.output_cache`.
VisualChatOutput = make_dataclass(
    "VisualChatOutput",
    [
        ("loss", "torch.Tensor | None", field(default=None)),
        ("loss_sum", "torch.Tensor | None", field(default=None)),
        ("num_tokens", "torch.Tensor | None", field(default=None)),
        ("logits", "torch.Tensor | None", field(default=None)),
        (CACHE_NAME, Any, field(default=None)),
    ],
    bases=(ModelOutput,),
)
VisualChatOutput.__module__ = __name__
VisualChatOutput.__doc__ = (
    "Forward result. `loss` is the token mean; `loss_sum`/`num_tokens` let callers re-weight."
)


class NewTokenEmbedding(nn.Module):
    """The LM's embedding table frozen, plus trainable rows for tokens dsvl added (ids >= base)."""

    def __init__(self, base: nn.Embedding, base_vocab: int, num_new: int) -> None:
        super().__init__()
        self.base = base
        self.base_vocab = base_vocab
        weight = base.weight.detach()[base_vocab : base_vocab + num_new].clone()
        self.new_rows = nn.Parameter(weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = ids >= self.base_vocab
        embeds = self.base(ids.masked_fill(is_new, 0))
        new = F.embedding((ids - self.base_vocab).clamp(min=0), self.new_rows)
        return torch.where(is_new.unsqueeze(-1), new.to(embeds.dtype), embeds)

    def merged_weight(self) -> torch.Tensor:
        """The full table with the trained new rows written in (used by exports)."""
        weight = self.base.weight.detach().clone()
        weight[self.base_vocab : self.base_vocab + self.new_rows.shape[0]] = self.new_rows.detach()
        return weight


class VisualChatModel(PreTrainedModel, GenerationMixin):
    """Vision encoder + projector + causal LM, with MMCA selectable per config.

    Args:
        vision: module mapping pixels [N, 3, S, S] to features [N, T_v, D_v].
        mm_projector: module mapping [N, T_v, D_v] to [N, T, H] with attribute `num_tokens`.
        language_model: a Hugging Face causal LM (unmodified), built with attn "dsvl_mmca"
            when MMCA is on.
        image_token_id: id of `<image>`; each image occupies T consecutive copies.
        mmca: use multi-modal causal attention; `image_attends_text` is its switch.
    """

    _supports_attention_backend = True
    _supports_sdpa = True
    _supports_flex_attn = True
    supports_gradient_checkpointing = True
    main_input_name = "input_ids"
    _skip_keys_device_placement = [CACHE_NAME]

    def __init__(
        self,
        vision: nn.Module,
        mm_projector: nn.Module,
        language_model: PreTrainedModel,
        image_token_id: int,
        mmca: bool = True,
        image_attends_text: bool = True,
        mmca_impl: str = "auto",
    ) -> None:
        super().__init__(copy.deepcopy(language_model.config))
        self.vision = vision
        self.mm_projector = mm_projector
        self.language_model = language_model
        self.image_token_id = image_token_id
        self.mmca = mmca
        self.image_attends_text = image_attends_text
        self.mmca_impl = mmca_impl
        # Several ranks: every rank must run every module in every step, whatever its micro-batch
        # holds (ZeRO-1/2 reduce gradients in buckets; ZeRO-3 gathers parameters per module).
        self.run_vision_without_images = False
        self.token_embed: nn.Module | None = None  # set for trainable.embeddings=new_tokens

    @property
    def tokens_per_image(self) -> int:
        return int(self.mm_projector.num_tokens)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_token_embedding(self, module: nn.Module) -> None:
        """Embed text through `module` (e.g. NewTokenEmbedding) instead of the LM's table."""
        self.token_embed = module

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        embed = self.token_embed if self.token_embed is not None else self.get_input_embeddings()
        return embed(input_ids)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    # ------------------------------------------------------------------ images

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> projected features [N, T, H] in the LM's dtype."""
        dtype = next(self.vision.parameters()).dtype
        features = self.vision(pixel_values.to(dtype))
        return self.mm_projector(features.to(next(self.mm_projector.parameters()).dtype))

    def place_images(
        self, embeds: torch.Tensor, input_ids: torch.Tensor, features: torch.Tensor
    ) -> torch.Tensor:
        """Write image features into the image-token positions of `embeds` (one masked_scatter)."""
        slots = input_ids == self.image_token_id
        expected = int(slots.sum())
        given = features.shape[0] * features.shape[1]
        if expected != given:
            raise DataError(
                f"the batch has {expected} <image> token positions but its images give {given} "
                f"feature vectors ({features.shape[0]} image(s) x {features.shape[1]}); every "
                f"image placeholder must expand to {self.tokens_per_image} ids (dsvl template)"
            )
        mask = slots.unsqueeze(-1).expand_as(embeds)
        return embeds.masked_scatter(mask, features.to(embeds.dtype))

    def _maybe_touch_vision(self, embeds: torch.Tensor) -> torch.Tensor:
        """A rank whose micro-batch has no image still runs encoder + projector on one blank image.

        Its features enter with weight 0, so the loss is unchanged, while every trainable vision and
        projector parameter gets a (zero) gradient and every ZeRO-3 gather happens, in training
        and evaluation alike, keeping the collectives of all ranks identical.
        """
        if not self.run_vision_without_images:
            return embeds
        size = getattr(self.vision, "image_size", 224)
        dummy = torch.zeros(1, 3, size, size, device=embeds.device)
        return embeds + 0.0 * self.encode_images(dummy).sum().to(embeds.dtype)

    # ------------------------------------------------------------------ forward

    def modality_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """0 pad, 1 text, 2 image for each position of `input_ids`."""
        modality = torch.where(input_ids == self.image_token_id, IMAGE, TEXT)
        if attention_mask is not None:
            modality = modality.masked_fill(attention_mask == 0, PAD)
        return modality

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        modality_ids: torch.Tensor | None = None,
        sequence_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: Any = None,
        past_key_values: Any = None,
        position_ids: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> VisualChatOutput:
        """Embed, place images, run the LM; loss over supervised positions when labels given.

        `modality_ids` must cover cached + current positions when a cache is used; without a
        cache it defaults to the one derived from `input_ids` and `attention_mask`. The KV cache
        comes as `cache` (transformers >= 5.24) or `past_key_values` (earlier); both are named
        here because `generate` passes only keywords the signature lists. `sequence_ids` [B, L]
        marks the conversations of packed rows (training and scoring only, no cache).
        """
        cache = cache if cache is not None else past_key_values
        embeds = self.embed_tokens(input_ids)
        if pixel_values is not None and pixel_values.shape[0] > 0:
            embeds = self.place_images(embeds, input_ids, self.encode_images(pixel_values))
        else:
            embeds = self._maybe_touch_vision(embeds)
        if modality_ids is None:
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("modality_ids covering cached positions are required with a cache")
            modality_ids = self.modality_ids(input_ids, attention_mask)
        if sequence_ids is not None and position_ids is None:
            position_ids = sequence_positions(sequence_ids)
        lm_kwargs = self._attention_kwargs(
            modality_ids, input_ids.shape[1], attention_mask, sequence_ids
        )
        if sequence_ids is not None and not self.mmca:
            lm_kwargs = self._packed_causal(lm_kwargs, embeds, position_ids, sequence_ids)
        if labels is not None:
            # Positions whose next token is supervised in some row: the LM's own head and logit
            # post-processing (softcapping, logit scaling) run there only.
            keep = labels[:, 1:] != IGNORE_INDEX
            logits_to_keep = keep.any(dim=0).nonzero().flatten()
        lm_out = self.language_model(
            inputs_embeds=embeds,
            position_ids=position_ids,
            **cache_kwargs(cache),
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **lm_kwargs,
            **kwargs,
        )
        out = VisualChatOutput(**{CACHE_NAME: output_cache(lm_out)})
        if labels is not None:
            out.loss_sum, out.num_tokens = self._loss(lm_out.logits, labels, logits_to_keep)
            out.loss = out.loss_sum / out.num_tokens.clamp(min=1)
        else:
            out.logits = lm_out.logits
        return out

    def _attention_kwargs(
        self,
        modality_ids: torch.Tensor,
        q_len: int,
        attention_mask: torch.Tensor | None,
        sequence_ids: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        if not self.mmca:
            mask = attention_mask if attention_mask is not None else (modality_ids != PAD).long()
            return {"attention_mask": mask}
        masks = build_mmca_masks(
            modality_ids,
            q_len,
            image_attends_text=self.image_attends_text,
            impl=self.mmca_impl,
            sequence_ids=sequence_ids,
        )
        return {"mmca_masks": masks, "modality_ids": modality_ids}

    def _packed_causal(
        self,
        lm_kwargs: dict[str, Any],
        embeds: torch.Tensor,
        position_ids: torch.Tensor,
        sequence_ids: torch.Tensor,
    ) -> dict[str, Any]:
        """MMCA off: the LM's causal mask confined to each packed conversation."""
        lm_config = self.language_model.config
        if "flash" in str(lm_config._attn_implementation):
            # flash kernels take a 2-D padding mask only: the same-sequence rule would be lost
            raise ValueError(
                "packed rows need an attention implementation that takes a 4-D mask (sdpa, "
                f"eager, flex_attention), not {lm_config._attn_implementation!r}"
            )
        mask = packed_causal_mask(
            lm_config, embeds, lm_kwargs["attention_mask"], position_ids, sequence_ids
        )
        if mask is None:  # an implementation with no registered mask function: it would leak
            raise ValueError(
                f"attention {lm_config._attn_implementation!r} builds no attention mask, so "
                "packed conversations would see each other: use sdpa, eager or flex_attention"
            )
        return {"attention_mask": mask}

    def _loss(
        self, logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of next-token cross-entropy over supervised positions, and their count.

        `logits` [B, K, V] are the LM's at `positions` [K] (those supervised in some row);
        entries not supervised in their own row are dropped. A batch with no supervised
        position gives 0 (not NaN) with the graph still connected through the LM and its head
        (every rank must run the same backward: ZeRO-1/2 reduce gradients in matching buckets).
        """
        targets = labels[:, 1:][:, positions]
        keep = targets != IGNORE_INDEX
        loss_sum = F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")
        if positions.numel() == 0:
            loss_sum = logits.sum() * 0.0
        return loss_sum, keep.sum()

    # ------------------------------------------------------------------ generation

    def prepare_inputs_for_generation(
        self, input_ids: torch.Tensor, **kwargs: Any
    ) -> dict[str, Any]:
        """HF generation hook: modality ids span the whole sequence, cached positions included.

        `input_ids` here is always the full sequence so far (prompt, history and generated
        tokens), so the modality of every key, including cached image tokens, is derived from it.
        """
        kwargs.pop("modality_ids", None)
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        inputs["modality_ids"] = self.modality_ids(input_ids, kwargs.get("attention_mask"))
        return inputs
