"""The composite model: builder, image placement, trainable policies, generation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsvl_cli.config import Config, validate_config
from dsvl_cli.data.conversation import Conversation, Message
from dsvl_cli.data.template import encode_conversation, encode_prompt
from dsvl_cli.demo.synthetic import generate_synthetic
from dsvl_cli.errors import CheckpointError, DataError
from dsvl_cli.model.builder import Built, build_model
from dsvl_cli.model.hf_compat import cache_kwargs, output_cache


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    generate_synthetic(out, num=12, seed=0)
    return out


def make_config(shapes: Path, **sections: dict) -> Config:
    tree: dict = {
        "model": {
            "language_model": str(shapes / "models/lm"),
            "vision": {"kind": "clip", "path": str(shapes / "models/vision")},
            "max_seq_len": 512,
        }
    }
    for key, value in sections.items():
        tree.setdefault(key, {}).update(value)
    return validate_config(tree)


def build(shapes: Path, **sections: dict) -> Built:
    torch.manual_seed(0)
    return build_model(make_config(shapes, **sections))


def batch_for(built: Built, convs: list[Conversation], shapes: Path) -> dict[str, torch.Tensor]:
    """Encode conversations with the template and collate by hand (right padding)."""
    from PIL import Image

    model, tok = built.model, built.tokenizer
    encoded = [
        encode_conversation(c, tok, model.image_token_id, model.tokens_per_image, 512)
        for c in convs
    ]
    length = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(convs), length), tok.pad_token_id)
    labels = torch.full((len(convs), length), -100)
    mask = torch.zeros((len(convs), length), dtype=torch.long)
    for row, enc in enumerate(encoded):
        n = len(enc.input_ids)
        ids[row, :n], labels[row, :n], mask[row, :n] = (
            torch.tensor(enc.input_ids),
            torch.tensor(enc.labels),
            1,
        )
    pixels = [built.image_transform(Image.open(shapes / p)) for c in convs for p in c.images]
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "pixel_values": torch.stack(pixels) if pixels else None,
    }


def two_convs() -> list[Conversation]:
    return [
        Conversation(
            [
                Message("user", "<image>\n<image>\nWhich image has a red square?"),
                Message("assistant", "the first"),
            ],
            images=["images/000000.png", "images/000001.png"],
        ),
        Conversation(
            [Message("user", "<image>\nWhat colour is it?"), Message("assistant", "blue")],
            images=["images/000002.png"],
        ),
    ]


def test_builder_loads_local_folders(shapes: Path) -> None:
    built = build(shapes)
    assert built.model.tokens_per_image == 5  # 2 x 2 patches of 16 pixels + CLS
    assert built.tokenizer.convert_tokens_to_ids("<image>") == built.model.image_token_id
    assert built.model.get_input_embeddings().num_embeddings == len(built.tokenizer)


def test_builder_names_missing_files(shapes: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        build_model(make_config(shapes, model={"language_model": str(tmp_path / "nope")}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        build_model(make_config(shapes, model={"language_model": str(tmp_path / "empty")}))


def test_placement_matches_per_sample_loop(shapes: Path) -> None:
    built = build(shapes)
    model = built.model
    batch = batch_for(built, two_convs(), shapes)
    ids = batch["input_ids"]
    feats = model.encode_images(batch["pixel_values"])
    placed = model.place_images(model.embed_tokens(ids), ids, feats)
    expected = model.embed_tokens(ids).clone()
    image = 0
    for row in range(ids.shape[0]):  # the slow reference: walk runs of image tokens in order
        positions = (ids[row] == model.image_token_id).nonzero().flatten().tolist()
        for start in range(0, len(positions), model.tokens_per_image):
            run = positions[start : start + model.tokens_per_image]
            expected[row, run] = feats[image]
            image += 1
    assert image == feats.shape[0] == 3
    torch.testing.assert_close(placed, expected, rtol=0, atol=0)
    with pytest.raises(DataError, match="image"):
        model.place_images(model.embed_tokens(ids), ids, feats[:2])


POLICIES = {
    "default": ({}, {"mm_projector", "embed_tokens"}),
    "frozen_embeddings": ({"embeddings": "frozen"}, {"mm_projector"}),
    "new_tokens": ({"embeddings": "new_tokens"}, {"mm_projector", "new_rows"}),
    "lm_lora": ({"language_model": "lora", "embeddings": "frozen"}, {"mm_projector", "lm.lora"}),
    "vision_lora": ({"vision": "lora", "embeddings": "frozen"}, {"mm_projector", "vision.lora"}),
    "vision_full": ({"vision": "full", "embeddings": "frozen"}, {"mm_projector", "vision"}),
    "lm_full": ({"language_model": "full"}, {"mm_projector", "language_model"}),
}


def _group(name: str) -> str:
    if "lora_" in name:
        return "lm.lora" if name.startswith("language_model") else "vision.lora"
    for key in ("mm_projector", "new_rows", "embed_tokens"):
        if key in name:
            return key
    return name.split(".")[0]


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_trainable_policy_touches_expected_params(shapes: Path, policy: str) -> None:
    trainable, groups = POLICIES[policy]
    built = build(shapes, trainable=trainable)
    model = built.model
    out = model(**batch_for(built, two_convs(), shapes))
    assert torch.isfinite(out.loss) and out.num_tokens > 0
    out.loss.backward()
    touched = {
        _group(n)
        for n, p in model.named_parameters()
        if p.grad is not None and p.grad.abs().sum() > 0
    }
    trainable_names = {_group(n) for n, p in model.named_parameters() if p.requires_grad}
    if policy == "lm_full":  # the whole LM trains: embed_tokens is part of it
        touched.discard("embed_tokens")
        trainable_names.discard("embed_tokens")
    assert trainable_names == groups
    if policy == "new_tokens":
        # the only added token is <image>, whose embedding masked_scatter replaces: no gradient
        groups = groups - {"new_rows"}
    assert touched == groups


def test_loss_without_supervised_tokens_is_zero_not_nan(shapes: Path) -> None:
    built = build(shapes)
    batch = batch_for(built, two_convs(), shapes)
    batch["labels"].fill_(-100)
    out = built.model(**batch)
    assert out.num_tokens == 0 and out.loss.item() == 0.0
    out.loss.backward()


@pytest.mark.parametrize("mmca", [True, False])
def test_generate_greedy_and_cache_reuse(shapes: Path, mmca: bool) -> None:
    from PIL import Image

    built = build(shapes, model={"mmca": mmca})
    model, tok = built.model.eval(), built.tokenizer
    conv = Conversation(
        [Message("user", "<image>\nWhat colour is the square?")], ["images/000000.png"]
    )
    ids = torch.tensor([encode_prompt(conv, tok, model.image_token_id, model.tokens_per_image)])
    pixels = built.image_transform(Image.open(shapes / conv.images[0]))[None]
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": tok.pad_token_id}
    out = model.generate(input_ids=ids, pixel_values=pixels, **kwargs)
    assert out.shape[1] == ids.shape[1] + 5
    # Continuing from the cache equals re-encoding the whole history from scratch.
    with torch.no_grad():
        first = model.generate(
            input_ids=ids, pixel_values=pixels, return_dict_in_generate=True, **kwargs
        )
        follow = torch.tensor(
            [
                encode_prompt(
                    Conversation([Message("user", "And the circle?")], []),
                    tok,
                    model.image_token_id,
                    model.tokens_per_image,
                    include_system=False,
                )
            ]
        )
        history = torch.cat([first.sequences, follow], dim=1)
        cache = cache_kwargs(output_cache(first))
        cached = model.generate(input_ids=history, **cache, **kwargs)
        fresh = model.generate(input_ids=history, pixel_values=pixels, **kwargs)
    assert torch.equal(cached, fresh)


def test_sampling_streaming_and_eos_stop(shapes: Path) -> None:
    from PIL import Image
    from transformers.generation.streamers import BaseStreamer

    built = build(shapes)
    model, tok = built.model.eval(), built.tokenizer
    conv = Conversation([Message("user", "<image>\nWhat colour?")], ["images/000000.png"])
    ids = torch.tensor([encode_prompt(conv, tok, model.image_token_id, model.tokens_per_image)])
    pixels = built.image_transform(Image.open(shapes / conv.images[0]))[None]

    class Collect(BaseStreamer):
        def __init__(self) -> None:
            self.chunks: list[list[int]] = []

        def put(self, value: torch.Tensor) -> None:
            self.chunks.append(value.flatten().tolist())

        def end(self) -> None:
            self.chunks.append([])

    settings = {
        "do_sample": True,
        "temperature": 0.8,
        "top_p": 0.9,
        "top_k": 20,
        "repetition_penalty": 1.1,
        "max_new_tokens": 6,
        "pad_token_id": tok.pad_token_id,
    }
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        streamer = Collect()
        runs.append(
            model.generate(input_ids=ids, pixel_values=pixels, streamer=streamer, **settings)
        )
    assert torch.equal(runs[0], runs[1])  # seeded sampling is reproducible
    streamed = [t for chunk in streamer.chunks[1:] for t in chunk]  # chunk 0 is the prompt
    assert streamed == runs[1][0, ids.shape[1] :].tolist()
    # Forcing EOS as the most likely token stops generation after one step.
    bias = torch.zeros(len(tok))
    bias[tok.eos_token_id] = 1e4
    model.get_output_embeddings().bias = torch.nn.Parameter(bias)
    out = model.generate(
        input_ids=ids,
        pixel_values=pixels,
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    assert out.shape[1] == ids.shape[1] + 1 and out[0, -1] == tok.eos_token_id
