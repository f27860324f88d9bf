"""Shared by the LM-family tests: tiny family folders, configs over them, and one encoded batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsvl_cli.config import Config, validate_config
from dsvl_cli.data.conversation import Conversation, Message
from dsvl_cli.data.template import encode_conversation, encode_prompt
from dsvl_cli.demo.lm_families import build_family_lm
from dsvl_cli.model.builder import Built, build_model


def family_folder(shapes: Path, family: str, name: str | None = None, **overrides: Any) -> Path:
    """A tiny `family` LM with the synthetic tokenizer, saved once under `shapes/lms/`."""
    out = shapes / "lms" / (name or family)
    if not (out / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(shapes / "models/lm")
        build_family_lm(out, family, tokenizer, **overrides)
    return out


def family_config(shapes: Path, lm: Path, **sections: dict[str, Any]) -> Config:
    """A validated config: `lm` + the synthetic CLIP tower, max_seq_len 256, `sections` merged."""
    tree: dict[str, Any] = {
        "model": {
            "language_model": str(lm),
            "vision": {"kind": "clip", "path": str(shapes / "models/vision")},
            "max_seq_len": 256,
        }
    }
    for key, value in sections.items():
        tree.setdefault(key, {}).update(value)
    return validate_config(tree)


def build(config: Config) -> Built:
    torch.manual_seed(0)
    return build_model(config)


def image_conversation() -> Conversation:
    return Conversation(
        [
            Message("user", "<image>\nWhat colour is the square?"),
            Message("assistant", "the square is red"),
        ],
        images=["images/000000.png"],
    )


def image_batch(built: Built, shapes: Path) -> dict[str, torch.Tensor]:
    """One conversation with an image: ids, labels, mask and pixels, batch 1."""
    model = built.model
    conv = image_conversation()
    enc = encode_conversation(
        conv, built.tokenizer, model.image_token_id, model.tokens_per_image, 256
    )
    pixels = built.image_transform(Image.open(shapes / conv.images[0]))[None]
    ids = torch.tensor([enc.input_ids])
    return {
        "input_ids": ids,
        "labels": torch.tensor([enc.labels]),
        "attention_mask": torch.ones_like(ids),
        "pixel_values": pixels,
    }


def image_prompt(built: Built, shapes: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt (ids [1, L], pixels [1, 3, S, S]) asking about one image."""
    model = built.model
    conv = Conversation([Message("user", "<image>\nWhat is it?")], ["images/000000.png"])
    ids = encode_prompt(conv, built.tokenizer, model.image_token_id, model.tokens_per_image)
    pixels = built.image_transform(Image.open(shapes / conv.images[0]))[None]
    return torch.tensor([ids]), pixels


def own_logits(lm: Path, ids: torch.Tensor) -> torch.Tensor:
    """The unmodified LM's logits [B, L, V_base] for text ids (its default attention)."""
    reference = AutoModelForCausalLM.from_pretrained(lm).eval()
    with torch.no_grad():
        return reference(input_ids=ids).logits


def text_ids(built: Built, length: int = 24, seed: int = 0) -> tuple[torch.Tensor, int]:
    """Random ids [2, length] from the LM's original vocabulary, and that vocabulary's size."""
    base = built.model.language_model.config.get_text_config().vocab_size
    base = min(base, built.tokenizer.convert_tokens_to_ids("<image>"))
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, base, (2, length), generator=generator), base
