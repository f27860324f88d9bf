"""Shared by the chat, eval and session tests: a tiny export, and a bias that makes it talk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dsvl_cli.config import validate_config
from dsvl_cli.demo.synthetic import generate_synthetic
from dsvl_cli.inference.loader import LoadedModel
from dsvl_cli.model.builder import build_model
from dsvl_cli.train.export import export_model

# Random weights answer in bytes; a bias on a few words (and on EOS, just below them) makes the
# tiny model answer in words, stop early in some rounds and run to max_new_tokens in others, and
# start some answers with a space (a non-canonical tokenisation the session must repair). The EOS
# bias is tuned by hand for the synthetic generator's text (its tokenizer): the session test
# checks that both endings occur, so re-tune it if that text changes.
WORDS = ["red", "blue", " the", " first", " second", " circle", " square", "."]


def make_export(root: Path, **model: Any) -> Path:
    """Synthetic data + tiny models in `root`, and a random-weight export in `root/export`."""
    generate_synthetic(root, num=12, seed=0)
    tree = {
        "model": {
            "language_model": str(root / "models/lm"),
            "vision": {"kind": "clip", "path": str(root / "models/vision")},
            "max_seq_len": 512,
            **model,
        }
    }
    config = validate_config(tree)
    torch.manual_seed(0)
    built = build_model(config)
    export_model(built.model, built, config, root / "export", {"step": 0})
    return root


def randomize_trainable(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every trainable parameter non-zero values (LoRA B starts at zero), by name order."""
    gen = torch.Generator().manual_seed(seed)
    params = sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for _, param in params:
            shape = param.ds_shape if hasattr(param, "ds_shape") else param.shape
            value = 0.05 * torch.randn(shape, generator=gen)
            if hasattr(param, "ds_id"):
                import deepspeed

                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    param.copy_(value)
            else:
                param.copy_(value)


def steer(loaded: LoadedModel) -> LoadedModel:
    """Bias the LM head toward WORDS and EOS so random-weight answers are readable."""
    tok = loaded.built.tokenizer
    bias = torch.zeros(len(tok))
    bias[[i for w in WORDS for i in tok(w, add_special_tokens=False)["input_ids"]]] = 6.0
    bias[tok.eos_token_id] = 5.8
    loaded.model.get_output_embeddings().bias = torch.nn.Parameter(bias)
    return loaded
