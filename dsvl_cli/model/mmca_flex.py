"""FlexAttention kernels for MMCA: one block mask per branch, and the (compiled) flex call.

`mmca.py` owns the semantics (the visibility rule, the masks dataclass, the attention function);
this module only turns a rule into `BlockMask`s and runs `flex_attention` with them. Both
behaviours below were read in torch's Triton templates (`_inductor/kernel/flex/templates`): a
query row with no visible key returns 0 in the forward (`l_i == 0 -> 1`) and gets no NaN in the
backward (`lse == -inf -> 0`), so no extra guard is needed here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

# rule(query_ok, key_ok, query_pos, key_pos, same_sequence) -> bool tensor: may this query read
# this key?
VisibilityRule = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor | bool], Tensor]


def branch_block_mask(
    rule: VisibilityRule,
    *,
    query_ok: Tensor,
    key_ok: Tensor,
    q_len: int,
    sequence_ids: Tensor | None = None,
) -> BlockMask:
    """Build the block-sparse mask of one MMCA branch.

    Args:
        rule: the visibility rule shared with the dense masks (one source of truth).
        query_ok: bool [B, Lk], per absolute position: may a query there use this branch.
        key_ok: bool [B, Lk], per absolute position: is the key there in this branch.
        q_len: number of queries; they are the last `q_len` of the `Lk` positions.
        sequence_ids: LongTensor [B, Lk] of a packed row (None: one sequence per row); keys of
            another sequence are masked, so whole blocks between conversations are skipped.

    Returns:
        A BlockMask of shape [B, 1, q_len, Lk] (broadcast over heads).
    """
    batch, kv_len = key_ok.shape
    offset = kv_len - q_len

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        q_pos = q_idx + offset
        return rule(query_ok[b, q_pos], key_ok[b, kv_idx], q_pos, kv_idx, True)

    def packed_mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        q_pos = q_idx + offset
        same = sequence_ids[b, q_pos] == sequence_ids[b, kv_idx]
        return rule(query_ok[b, q_pos], key_ok[b, kv_idx], q_pos, kv_idx, same)

    if sequence_ids is not None:
        mask_mod = packed_mask_mod

    return create_block_mask(mask_mod, batch, None, q_len, kv_len, device=key_ok.device)


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    # Compiled once per process; default dynamic=None lets a second sequence length switch to a
    # dynamic-shape kernel instead of recompiling for every length. Fresh mask_mod closures
    # over new tensors do not recompile (dynamo guards on tensor metadata, not identity).
    return torch.compile(flex_attention)


def _flex_fn(device: torch.device) -> Callable[..., Tensor]:
    # Uncompiled flex materialises the full score matrix: only for CPU tests and debugging.
    # Inside an outer torch.compile, call the raw op and let the outer compile fuse it.
    if device.type == "cpu" or torch.compiler.is_compiling():
        return flex_attention
    return _compiled_flex()


def flex_branch(
    query: Tensor, key: Tensor, value: Tensor, *, block_mask: BlockMask, scale: float | None
) -> Tensor:
    """One branch of MMCA with FlexAttention; GQA-aware.

    Args:
        query: [B, Hq, Lq, D]; key, value: [B, Hkv, Lk, D] with Hq a multiple of Hkv.
        block_mask: from `branch_block_mask`.
        scale: softmax scale (None means 1/sqrt(D)).

    Returns:
        [B, Hq, Lq, D]; rows with no visible key are 0.
    """
    repeats = query.shape[1] // key.shape[1]
    enable_gqa = repeats > 1
    if repeats & (repeats - 1):
        # Flex's decoding kernel (short queries) needs a power-of-two number of query heads per
        # kv head (torch/_inductor/kernel/flex/flex_decoding.py); repeat kv for other ratios.
        key = key.repeat_interleave(repeats, dim=1)
        value = value.repeat_interleave(repeats, dim=1)
        enable_gqa = False
    flex = _flex_fn(query.device)
    return flex(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
