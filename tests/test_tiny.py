"""Tiny offline base models: tokenizer round trip, LM and CLIP folders load, determinism."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionModel,
)

from dsvl_cli.data.template import (  # noqa: E402
    ANSWER_HEADER,
    IMAGE_MARKER,
    QUESTION_HEADER,
    SYSTEM_PROMPT,
)
from dsvl_cli.demo.tiny_models import build_tiny_clip, build_tiny_lm, train_tiny_tokenizer  # noqa: E402

CORPUS = [
    "What colour is the circle?",
    "red",
    "Which image has a blue square, the first or the second?",
    "the second",
    "Which shape is yellow?",
    "triangle",
] * 20
TEMPLATE_STRINGS = [
    SYSTEM_PROMPT,
    *(IMAGE_MARKER.format(k=k) + "\n" for k in range(1, 9)),
    QUESTION_HEADER + "\nWhat colour is the circle?\n\n" + ANSWER_HEADER + "\n",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("lm")
    build_tiny_lm(path, tokenizer)
    return path


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vision")
    build_tiny_clip(path)
    return path


def test_tokenizer_special_tokens_and_no_automatic_bos_eos(tokenizer):
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id) == (0, 1)
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 3)
    assert tokenizer.padding_side == "right"
    ids = tokenizer("red")["input_ids"]
    assert ids == tokenizer("red", add_special_tokens=True)["input_ids"]
    assert tokenizer.bos_token_id not in ids and tokenizer.eos_token_id not in ids
    assert 260 <= len(tokenizer) <= 512  # 256 bytes + 4 specials + merges, capped


def test_tokenizer_round_trips_through_save_pretrained(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tokenizer)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token) == (
        "<s>",
        "</s>",
        "<pad>",
        "<unk>",
    )
    for text in [*TEMPLATE_STRINGS, "unseen wörds, émojis 🙂 and\ttabs\n"]:
        ids = loaded(text)["input_ids"]
        assert ids == tokenizer(text)["input_ids"]
        assert loaded.decode(ids) == text


def test_tokenizer_learns_template_and_corpus_words(tokenizer):
    # Weighted template strings and frequent corpus words become single tokens.
    for word in ["red", " circle", "###", " Question", " assistant"]:
        assert len(tokenizer(word)["input_ids"]) == 1, word


def test_tokenizer_training_is_deterministic(tmp_path, tokenizer):
    again = train_tiny_tokenizer(CORPUS)
    tokenizer.save_pretrained(tmp_path / "a")
    again.save_pretrained(tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_lm_folder_loads_and_gives_vocab_logits(lm_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.bos_token_id == tokenizer.bos_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (64, 2)
    assert model.config.num_key_value_heads == 2
    folder_tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    ids = folder_tokenizer(SYSTEM_PROMPT + "What colour is the circle?", return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=ids["input_ids"]).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    assert (lm_dir / "model.safetensors").is_file()


def test_vision_folder_loads_and_gives_17_tokens(vision_dir):
    model = CLIPVisionModel.from_pretrained(vision_dir).eval()
    processor = CLIPImageProcessor.from_pretrained(vision_dir)
    small = Image.new("RGB", (32, 32), (255, 0, 0))
    large = Image.new("RGB", (64, 48), (0, 0, 255))
    pixels = processor(images=[small, large], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (2, 3, 32, 32)
    # Pure red normalised with CLIP mean/std: (1 - 0.4815) / 0.2686 in the red channel.
    assert pixels[0, 0, 0, 0].item() == pytest.approx((1 - 0.48145466) / 0.26862954, abs=1e-4)
    with torch.no_grad():
        hidden = model(pixel_values=pixels[:1]).last_hidden_state
    assert hidden.shape == (1, 17, 64)


def _read(path: Path) -> bytes:
    return path.read_bytes()


def test_builds_are_byte_identical_for_a_seed_and_differ_across_seeds(tmp_path, tokenizer):
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        build_tiny_lm(tmp_path / name / "lm", tokenizer, seed=seed)
        build_tiny_clip(tmp_path / name / "vision", seed=seed)
    for sub in ("lm", "vision"):
        a, b, c = (_read(tmp_path / n / sub / "model.safetensors") for n in "abc")
        assert a == b
        assert a != c
        assert _read(tmp_path / "a" / sub / "config.json") == _read(
            tmp_path / "b" / sub / "config.json"
        )


def test_builds_leave_the_global_rng_alone(tmp_path, tokenizer):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_lm(tmp_path / "lm", tokenizer, seed=7)
    build_tiny_clip(tmp_path / "vision", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_sizes_are_parameters(tmp_path, tokenizer):
    build_tiny_lm(tmp_path / "lm", tokenizer, hidden_size=32, layers=1, heads=2, kv_heads=1)
    build_tiny_clip(tmp_path / "vision", image_size=48, patch_size=16, hidden_size=32)
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    assert (lm.config.hidden_size, lm.config.num_hidden_layers) == (32, 1)
    vision = CLIPVisionModel.from_pretrained(tmp_path / "vision")
    processor = CLIPImageProcessor.from_pretrained(tmp_path / "vision")
    pixels = processor(images=Image.new("RGB", (48, 48)), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = vision(pixel_values=pixels).last_hidden_state
    assert hidden.shape == (1, 10, 32)
