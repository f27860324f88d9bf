"""Multi-modal causal attention (MMCA) as a transformers attention function.

`register_mmca()` adds `dsvl_mmca` to transformers' `AttentionInterface`, so any decoder that uses
the registry (LLaMA, Qwen2, Mistral, ...) runs MMCA in every layer when built with
`attn_implementation="dsvl_mmca"`. Per query, two separately normalised attentions are summed:

| query          | branch A (image keys, own softmax) | branch B (text keys, own softmax)        |
|----------------|------------------------------------|------------------------------------------|
| text           | image tokens at earlier positions  | text tokens at earlier positions + itself |
| image          | itself only                        | earlier text (if `image_attends_text`)    |
| pad            | nothing                            | nothing                                   |

A branch with no visible key contributes exactly zero: a text token before the first image gets
no image contribution (the original leaked a uniform average over *future* images; we fix that),
and pad rows output zeros. Pad keys are never visible. Modality ids are 0 pad, 1 text, 2 image
(any other value is treated as pad), one per key; queries are the last Lq keys, and key j is
visible to the query at absolute position p only if j <= p, so KV-cache decoding applies the same
rules when the caller passes modality ids for the whole key range (growing like a 2-D mask).

Speed (why the kernels look like this):
- Masks are built once per model forward (`build_mmca_masks`) and reach every layer through the
  forward kwarg `mmca_masks=`; no per-layer, per-token or per-sample Python work.
- The image branch of an image query is a softmax over one key, i.e. exactly that token's value,
  so it is added directly (`_add_own_value`) instead of attending over a diagonal. What is left
  is branch A = text queries x earlier image keys and branch B = queries x earlier text keys:
  disjoint key sets whose union is the causal mask minus the image x image blocks. With
  block-sparse FlexAttention the two calls together cost about one causal pass, slightly less
  (no image x image blocks), and no block is computed twice except at text/image boundaries.
- One flex call cannot do both branches: it normalises over the union of their keys, and the
  share of each branch in that sum is not returned, so the two normalisers cannot be recovered
  without a second pass. Two calls over disjoint block sets are the cheapest exact form.
- Packed rows (dense): queries run in tiles of `DENSE_TILE`, each over keys from the earliest
  conversation start in the tile, so cross-conversation and future scores are mostly skipped.
- Not done yet (a further lever): gathering text tokens so branch B for text queries becomes
  plain causal attention over the compacted text, run by SDPA's flash kernel.

Implementations: "dense" (SDPA with boolean [B,1,Lq,Lk] masks; CPU, any device, decoding) and
"flex" (FlexAttention block masks, compiled on CUDA; forward-only on CPU). "auto" picks flex on
CUDA when Lq > 1 and dense otherwise (decode steps are cheap and would recompile flex).

Packing: `sequence_ids` [B, Lk] (1, 2, ... per conversation of a packed row, 0 on pads) add one
rule to both branches: a key is visible only to queries of the same sequence, and "has a key"
is judged within the query's own sequence. None (every unpacked forward, and decoding) means
one sequence per row.

Sliding-window and softcapped models are refused with a clear error (neither is implemented).
transformers builds no attention mask for an implementation without a mask function registered
under the same name (`masking_utils._preprocess_mask_arguments` returns None early), which is what
we want: we register none, so no useless 4-D mask is built, and `attention_mask` is ignored here
(padding comes from modality id 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask
from transformers import AttentionInterface

from dsvl_cli.model.mmca_flex import branch_block_mask, flex_branch
from dsvl_cli.model.sequences import sequence_starts

MMCA_ATTN_NAME = "dsvl_mmca"
PAD, TEXT, IMAGE = 0, 1, 2

MaskImpl = Literal["auto", "dense", "flex"]
DENSE_TILE = 256  # queries per SDPA call on dense packed rows (see `_packed_tiles`)


@dataclass(frozen=True)
class MMCAMasks:
    """Both MMCA branch masks for one model forward, shared by every layer.

    Attributes:
        impl: "dense" (bool tensors [B, 1, Lq, Lk]) or "flex" (BlockMasks).
        q_len: number of queries (the last q_len of the kv_len positions).
        kv_len: number of keys the modality ids cover.
        image_branch: branch A mask (text queries -> earlier image keys).
        text_branch: branch B mask (queries -> earlier text keys).
        has_image_keys: bool [B, 1, Lq, 1], the query has at least one branch-A key.
        has_text_keys: bool [B, 1, Lq, 1], the query has at least one branch-B key.
        image_queries: bool [B, 1, Lq, 1], the query is an image token (its branch A = itself).
        tiles: dense packed rows only: (q0, q1, k0) query tiles and the first key any of their
            queries may see; None: one SDPA call over the whole [Lq, Lk] mask.
    """

    impl: Literal["dense", "flex"]
    q_len: int
    kv_len: int
    image_branch: Tensor | BlockMask
    text_branch: Tensor | BlockMask
    has_image_keys: Tensor
    has_text_keys: Tensor
    image_queries: Tensor
    tiles: tuple[tuple[int, int, int], ...] | None = None


def visible(
    query_ok: Tensor,
    key_ok: Tensor,
    query_pos: Tensor,
    key_pos: Tensor,
    same_sequence: Tensor | bool = True,
) -> Tensor:
    """The MMCA visibility rule of one branch (broadcasting; also the flex mask_mod body)."""
    return query_ok & key_ok & (key_pos <= query_pos) & same_sequence


def _branch_sides(
    modality_ids: Tensor, image_attends_text: bool
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Per-position (query_ok, key_ok) bool [B, Lk] for branch A (image keys) and B (text keys)."""
    is_text = modality_ids == TEXT
    is_image = modality_ids == IMAGE
    text_branch_queries = (is_text | is_image) if image_attends_text else is_text
    return (is_text, is_image), (text_branch_queries, is_text)


def _has_keys(query_ok: Tensor, key_ok: Tensor, q_len: int, starts: Tensor | None) -> Tensor:
    """bool [B, 1, Lq, 1]: the query may use the branch and some key at or before it (in its
    own sequence when `starts`, from `sequence_starts`, is given) is in it."""
    counts = key_ok.long().cumsum(dim=-1)
    if starts is not None:
        # keys of this branch before the sequence's first position belong to earlier sequences
        counts = counts - (counts - key_ok.long()).gather(-1, starts)
    return (query_ok & (counts > 0))[:, None, -q_len:, None]


def _same_sequence(sequence_ids: Tensor | None, q_len: int) -> Tensor | bool:
    """bool [B, 1, Lq, Lk] (True when not packed): query and key are in the same sequence."""
    if sequence_ids is None:
        return True
    return sequence_ids[:, None, -q_len:, None] == sequence_ids[:, None, None, :]


def _dense_branch(
    query_ok: Tensor, key_ok: Tensor, has_keys: Tensor, q_len: int, same: Tensor | bool
) -> Tensor:
    """bool [B, 1, Lq, Lk] mask of one branch; empty rows get their own position as a dummy key."""
    kv_len = key_ok.shape[-1]
    key_pos = torch.arange(kv_len, device=key_ok.device)
    query_pos = key_pos[kv_len - q_len :, None]
    mask = visible(
        query_ok[:, None, -q_len:, None], key_ok[:, None, None, :], query_pos, key_pos, same
    )
    # Some SDPA kernels return NaN for a row with no key (and NaN gradients even if the row is
    # later discarded). A dummy key keeps every row finite; `_dense_mmca` zeroes these rows, so
    # their upstream gradient is 0 and the dummy key receives none.
    return mask | (~has_keys & (query_pos == key_pos))


def _resolve_impl(impl: MaskImpl, device: torch.device, q_len: int) -> Literal["dense", "flex"]:
    if impl not in ("auto", "dense", "flex"):
        raise ValueError(f"MMCA impl must be 'auto', 'dense' or 'flex', got {impl!r}")
    if impl == "auto":
        return "flex" if device.type == "cuda" and q_len > 1 else "dense"
    return impl


def _check_ids(modality_ids: Tensor, q_len: int | None, sequence_ids: Tensor | None) -> None:
    """ValueError unless the ids fit `build_mmca_masks` (see its docstring)."""
    if modality_ids.ndim != 2 or modality_ids.is_floating_point() or modality_ids.is_complex():
        raise ValueError(
            "modality_ids must be an integer tensor [batch, keys] (0 pad, 1 text, 2 image), "
            f"got dtype {modality_ids.dtype} and shape {tuple(modality_ids.shape)}"
        )
    kv_len = modality_ids.shape[1]
    if q_len is not None and not 0 < q_len <= kv_len:
        raise ValueError(f"q_len must be in [1, {kv_len}] (the modality ids' length), got {q_len}")
    if sequence_ids is not None and sequence_ids.shape != modality_ids.shape:
        raise ValueError(
            f"sequence_ids {tuple(sequence_ids.shape)} must match modality_ids "
            f"{tuple(modality_ids.shape)} (one id per key)"
        )


def build_mmca_masks(
    modality_ids: Tensor,
    q_len: int | None = None,
    *,
    image_attends_text: bool = True,
    impl: MaskImpl = "auto",
    sequence_ids: Tensor | None = None,
) -> MMCAMasks:
    """Build both MMCA branch masks once for a model forward (vectorised, no host sync).

    Args:
        modality_ids: LongTensor [B, Lk], 0 pad / 1 text / 2 image, covering cached + new keys.
        q_len: number of queries (the last q_len keys); None means Lk (training, prefill).
        image_attends_text: image queries also attend to earlier text (the original's behaviour).
        impl: "dense", "flex", or "auto" (flex on CUDA when q_len > 1, dense otherwise).
        sequence_ids: LongTensor [B, Lk], the conversation of each position in a packed row
            (contiguous runs; 0 on pads); None: one sequence per row.

    Returns:
        The masks to pass as `mmca_masks=` to the language model's forward.

    Raises:
        ValueError: modality_ids is not a 2-D integer tensor, or q_len is out of range.
    """
    _check_ids(modality_ids, q_len, sequence_ids)
    kv_len = modality_ids.shape[1]
    q_len = kv_len if q_len is None else q_len
    resolved = _resolve_impl(impl, modality_ids.device, q_len)
    (a_query, a_key), (b_query, b_key) = _branch_sides(modality_ids, image_attends_text)
    starts = None if sequence_ids is None else sequence_starts(sequence_ids)
    has_a = _has_keys(a_query, a_key, q_len, starts)
    has_b = _has_keys(b_query, b_key, q_len, starts)
    if resolved == "flex":
        seq = {"q_len": q_len, "sequence_ids": sequence_ids}
        image_branch = branch_block_mask(visible, query_ok=a_query, key_ok=a_key, **seq)
        text_branch = branch_block_mask(visible, query_ok=b_query, key_ok=b_key, **seq)
    else:
        same = _same_sequence(sequence_ids, q_len)
        image_branch = _dense_branch(a_query, a_key, has_a, q_len, same)
        text_branch = _dense_branch(b_query, b_key, has_b, q_len, same)
    image_queries = (modality_ids == IMAGE)[:, None, -q_len:, None]
    tiles = None
    if resolved == "dense" and starts is not None and q_len == kv_len:
        tiles = _packed_tiles(starts)
    return MMCAMasks(
        resolved, q_len, kv_len, image_branch, text_branch, has_a, has_b, image_queries, tiles
    )


def _packed_tiles(starts: Tensor) -> tuple[tuple[int, int, int], ...]:
    """(q0, q1, k0) per tile of `DENSE_TILE` queries; k0 = the earliest sequence start in it.

    Why: dense SDPA over a whole packed row computes every (query, key) score, most of them
    across conversations or in the future. Per tile only keys [k0, q1) can be visible (sequences
    are contiguous runs, so starts never decrease along a row), which brings the cost of a
    packed row close to that of its conversations run alone. One host sync per forward.
    """
    length = starts.shape[-1]
    firsts = starts[:, ::DENSE_TILE].min(dim=0).values.tolist()
    return tuple(
        (q0, min(q0 + DENSE_TILE, length), int(k0))
        for q0, k0 in zip(range(0, length, DENSE_TILE), firsts, strict=True)
    )


def _add_own_value(out: Tensor, value: Tensor, image_queries: Tensor) -> Tensor:
    """Add branch A of image queries: softmax over the query's own key alone = its own value."""
    batch, num_q_heads, q_len, head_dim = out.shape
    num_kv_heads = value.shape[1]
    own = value[:, :, -q_len:] * image_queries  # [B, Hkv, Lq, D]
    grouped = out.reshape(batch, num_kv_heads, num_q_heads // num_kv_heads, q_len, head_dim)
    return (grouped + own[:, :, None]).reshape(batch, num_q_heads, q_len, head_dim)


def _dense_mmca(
    query: Tensor, key: Tensor, value: Tensor, masks: MMCAMasks, scale: float | None, dropout: float
) -> Tensor:
    """Both branches with SDPA and boolean masks; [B, Hq, Lq, D]."""
    kwargs: dict[str, Any] = {"dropout_p": dropout, "scale": scale}
    repeats = query.shape[1] // key.shape[1]
    if repeats > 1 and query.device.type == "cpu":
        kwargs["enable_gqa"] = True
    elif repeats > 1:
        # CUDA's masked SDPA kernels do not take enable_gqa (it would fall back to the math
        # kernel); transformers' own SDPA path repeats kv in this case too.
        key = key.repeat_interleave(repeats, dim=1)
        value = value.repeat_interleave(repeats, dim=1)
    if masks.tiles is None:
        return _dense_pair(query, key, value, masks, slice(None), slice(None), kwargs)
    tiles = [
        _dense_pair(query, key, value, masks, slice(q0, q1), slice(k0, q1), kwargs)
        for q0, q1, k0 in masks.tiles
    ]
    return torch.cat(tiles, dim=2)


def _dense_pair(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    masks: MMCAMasks,
    rows: slice,
    cols: slice,
    kwargs: dict[str, Any],
) -> Tensor:
    """Both branches for queries `rows` over keys `cols`; [B, Hq, len(rows), D]."""
    sdpa = F.scaled_dot_product_attention
    query, key, value = query[:, :, rows], key[:, :, cols], value[:, :, cols]
    image_mask = masks.image_branch[:, :, rows, cols]  # type: ignore[index]
    text_mask = masks.text_branch[:, :, rows, cols]  # type: ignore[index]
    image = sdpa(query, key, value, attn_mask=image_mask, **kwargs)
    text = sdpa(query, key, value, attn_mask=text_mask, **kwargs)
    return torch.where(masks.has_image_keys[:, :, rows], image, 0.0) + torch.where(
        masks.has_text_keys[:, :, rows], text, 0.0
    )


def _flex_mmca(
    query: Tensor, key: Tensor, value: Tensor, masks: MMCAMasks, scale: float | None, dropout: float
) -> Tensor:
    """Both branches with FlexAttention block masks; [B, Hq, Lq, D] (empty rows are 0 by flex)."""
    if dropout > 0:
        raise ValueError(
            "MMCA's flex implementation has no attention dropout: set the LM config's "
            "attention_dropout to 0 or build the masks with impl='dense'"
        )
    image = flex_branch(query, key, value, block_mask=masks.image_branch, scale=scale)
    text = flex_branch(query, key, value, block_mask=masks.text_branch, scale=scale)
    return image + text


def _masks_for_call(module: Any, query: Tensor, key: Tensor, kwargs: dict[str, Any]) -> MMCAMasks:
    """The masks passed by the caller, or (fallback) built here from `modality_ids`."""
    masks = kwargs.get("mmca_masks")
    if masks is None:
        modality_ids = kwargs.get("modality_ids")
        if modality_ids is None:
            raise ValueError(
                f"attention '{MMCA_ATTN_NAME}' needs modality ids: pass mmca_masks="
                "build_mmca_masks(modality_ids) (or modality_ids=) to the language model's forward"
            )
        config = getattr(module, "config", None)
        sequence_ids = kwargs.get("sequence_ids")
        masks = build_mmca_masks(
            modality_ids.to(query.device),
            query.shape[2],
            image_attends_text=getattr(config, "mmca_image_attends_text", True),
            sequence_ids=None if sequence_ids is None else sequence_ids.to(query.device),
        )
    batch = query.shape[0]
    mask_batch = masks.image_queries.shape[0]
    if masks.q_len != query.shape[2] or masks.kv_len > key.shape[2] or mask_batch != batch:
        raise ValueError(
            f"MMCA masks cover batch {mask_batch}, {masks.q_len} queries and {masks.kv_len} keys, "
            f"but attention got batch {batch}, {query.shape[2]} queries and {key.shape[2]} keys: "
            "pass modality ids for every key (cached + new), like a growing attention_mask"
        )
    return masks


def _check_supported(kwargs: dict[str, Any], kv_len: int) -> None:
    if kwargs.get("softcap") is not None:
        raise ValueError(
            f"attention '{MMCA_ATTN_NAME}' does not implement logit softcapping: set "
            "model.mmca=false (dsvl refuses such an LM when the config is checked)"
        )
    window = kwargs.get("sliding_window")
    if window is not None and kv_len > window:
        raise ValueError(
            f"attention '{MMCA_ATTN_NAME}' does not implement sliding-window attention and "
            f"{kv_len} keys exceed the model's sliding_window={window}: shorten the sequences "
            "(model.max_seq_len) or set model.mmca=false"
        )


def mmca_attention(
    module: torch.nn.Module | None,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """MMCA attention with transformers' attention-function signature.

    Args:
        module: the calling attention layer (its config is read only by the fallback).
        query: [B, Hq, Lq, D]; key, value: [B, Hkv, Lk, D] (Hq a multiple of Hkv).
        attention_mask: ignored (padding comes from modality id 0; see module docstring).
        scaling: softmax scale (None means 1/sqrt(D)).
        dropout: attention dropout probability (dense only).
        **kwargs: `mmca_masks=` (preferred) or `modality_ids=` [B, Lk] (and, packed,
            `sequence_ids=` [B, Lk]); other layer kwargs.

    Returns:
        (attn_output [B, Lq, Hq, D], None).

    Raises:
        ValueError: neither masks nor modality ids were passed, or they do not fit the call.
    """
    masks = _masks_for_call(module, query, key, kwargs)
    _check_supported(kwargs, masks.kv_len)
    # A static cache returns keys for all its slots; those past the modality ids are unfilled.
    key, value = key[:, :, : masks.kv_len], value[:, :, : masks.kv_len]
    attend = _flex_mmca if masks.impl == "flex" else _dense_mmca
    out = attend(query, key, value, masks, scaling, dropout)
    out = _add_own_value(out, value, masks.image_queries)
    return out.transpose(1, 2).contiguous(), None


def register_mmca() -> None:
    """Register `mmca_attention` as `MMCA_ATTN_NAME` in transformers' registry (idempotent)."""
    AttentionInterface.register(MMCA_ATTN_NAME, mmca_attention)
