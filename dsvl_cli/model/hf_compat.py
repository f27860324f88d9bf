"""Every Hugging Face naming detail that changes between transformers minor releases, in one place.

transformers 5.24 renamed the key/value cache from `past_key_values` to `cache` in every
`ModelOutput`, every model `forward` and `generate`; the releases before it use `past_key_values`.
dsvl reads and passes caches only through the helpers here, so the next rename is one edit in this
module (plus a new upper bound in pyproject.toml, tested by `.ci/run`).

The name is detected from the installed release, not from its version number: whatever the
output classes declare is what `forward` and `generate` take.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

_FIELDS = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}

#: the keyword the installed transformers uses for a KV cache ("cache" from 5.24 on).
CACHE_NAME: str = "cache" if "cache" in _FIELDS else "past_key_values"


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """`{name: cache}` under the installed release's name; empty when `cache` is None."""
    return {} if cache is None else {CACHE_NAME: cache}


def output_cache(output: Any) -> Any:
    """The cache an LM forward or `generate` returned, under whichever name it uses."""
    return getattr(output, CACHE_NAME, None)


def enable_activation_checkpointing(model: Any, **kwargs: Any) -> None:
    """Turn on activation (gradient) checkpointing of a transformers model.

    transformers 5.23 renamed `gradient_checkpointing_enable` to `activation_checkpointing_enable`
    (the old name stays with a FutureWarning); earlier releases have only the old name.
    `kwargs` are `gradient_checkpointing_kwargs`, e.g. `{"use_reentrant": False}`.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None:
        enable = model.gradient_checkpointing_enable
    enable(kwargs or None)


def packed_causal_mask(
    config: Any,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    sequence_ids: torch.Tensor,
) -> Any:
    """The LM's own causal mask (in its attention implementation's format) for packed rows.

    transformers detects packing from restarting `position_ids` only when no 2-D
    `attention_mask` is given (`masking_utils._preprocess_mask_arguments`), and a padded packed
    row has one; so the same-sequence rule is added explicitly as an `and_mask_function`. The
    result is a prepared 4-D mask (or a flex BlockMask), which every decoder passes through
    unchanged. Args are [B, L] tensors; `sequence_ids` is 0 on pads.
    """
    from transformers.masking_utils import create_causal_mask

    def same_sequence(batch_idx: Any, head_idx: Any, q_idx: Any, kv_idx: Any) -> Any:
        # Pad queries (id 0) keep the unpacked rule (every earlier real key), so no query row
        # is fully masked (some GPU kernels return NaN for one); their outputs are never used.
        query = sequence_ids[batch_idx, q_idx]
        return (query == sequence_ids[batch_idx, kv_idx]) | (query == 0)

    # The cache argument is positional: its name changed with the 5.24 rename (see above).
    return create_causal_mask(
        config,
        inputs_embeds,
        attention_mask,
        None,
        position_ids=position_ids,
        and_mask_function=same_sequence,
    )
