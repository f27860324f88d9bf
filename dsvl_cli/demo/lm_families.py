"""Tiny random-weight causal LMs of every family the README's support matrix names.

Each is built from its transformers config class (64 hidden, 2 layers, 4 query heads sharing 2
key/value heads, 16 per head) and saved with `save_pretrained` next to a tokenizer, exactly like
a user's model folder. `tests/test_lm_matrix.py` runs every family through dsvl (MMCA on and off,
LoRA defaults, logits against the LM's own forward, cached against uncached generation); the
README's matrix is that test's table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

# family -> (config class name in transformers, what the family adds over the common shape).
# Gemma2 runs with attn_logit_softcapping=None (MMCA has no attention softcap; its default is
# refused with model.mmca on); its final logit softcap stays on. Granite and Cohere keep a logit
# scale that is not 1, so the logits check sees their post-processing.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "mistral": ("MistralConfig", {}),
    "gemma": ("GemmaConfig", {}),
    "gemma2": ("Gemma2Config", {"attn_logit_softcapping": None, "final_logit_softcapping": 0.5}),
    "gemma3": ("Gemma3TextConfig", {}),
    "phi3": ("Phi3Config", {}),
    "granite": ("GraniteConfig", {"logits_scaling": 8.0}),
    "cohere": ("CohereConfig", {"logit_scale": 0.0625}),
}

COMMON_SHAPE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}


def family_config(family: str, tokenizer: PreTrainedTokenizerBase, **overrides: Any) -> Any:
    """The tiny config of `family` sized to `tokenizer`; `overrides` replace any field.

    Raises:
        KeyError: `family` is not in FAMILIES.
    """
    class_name, extra = FAMILIES[family]
    config_class = getattr(transformers, class_name)
    fields = {
        **COMMON_SHAPE,
        **extra,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **overrides,
    }
    return config_class(**fields)


def build_family_lm(
    out_dir: Path, family: str, tokenizer: PreTrainedTokenizerBase, seed: int = 0, **overrides: Any
) -> Path:
    """Save a random-weight `family` LM plus `tokenizer` into `out_dir`; returns `out_dir`."""
    config = family_config(family, tokenizer, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
