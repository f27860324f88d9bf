"""The dry-run memory estimate: exact parameter counts from configs alone, ZeRO partitioning,
offload, activations, and folders that are missing."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from rich.console import Console

from dsvl_cli.config import Config, validate_config
from dsvl_cli.model.qwen_vit import QwenViTConfig
from dsvl_cli.train.memory import MemoryEstimate, estimate_memory

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# LLaMA-2-7B and CLIP ViT-L/14-224 shapes (config.json only, no weights)
H, LAYERS, INTER, VOCAB = 4096, 32, 11008, 32000
CLIP_H, CLIP_LAYERS, CLIP_INTER, CLIP_TOKENS = 1024, 24, 4096, 257


def llama_7b_params(vocab: int) -> int:
    per_layer = 4 * H * H + 3 * H * INTER + 2 * H  # q k v o, gate up down, two RMSNorms
    return 2 * vocab * H + LAYERS * per_layer + H  # embed + untied lm_head, final norm


def clip_l_params() -> int:
    embeddings = 3 * 14 * 14 * CLIP_H + CLIP_H + CLIP_TOKENS * CLIP_H  # patch conv, cls, pos
    per_layer = 4 * (CLIP_H * CLIP_H + CLIP_H) + 2 * CLIP_H * CLIP_INTER + CLIP_INTER + CLIP_H
    per_layer += 2 * 2 * CLIP_H  # two LayerNorms
    return embeddings + 2 * CLIP_H + CLIP_LAYERS * per_layer + 2 * CLIP_H  # pre- and post-LN


LINEAR_PROJECTOR = CLIP_H * H + H + 2 * H  # Linear + LayerNorm


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import CLIPVisionConfig, LlamaConfig

    root = tmp_path_factory.mktemp("configs")
    LlamaConfig(
        hidden_size=H,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=VOCAB,
    ).save_pretrained(root / "lm")
    CLIPVisionConfig(
        hidden_size=CLIP_H,
        intermediate_size=CLIP_INTER,
        num_hidden_layers=CLIP_LAYERS,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
    ).save_pretrained(root / "clip")
    (root / "qwen").mkdir()
    QwenViTConfig().to_json(root / "qwen" / "config.json")
    assert {p.name for p in (root / "lm").iterdir()} <= {"config.json", "generation_config.json"}
    return {"lm": root / "lm", "clip": root / "clip", "qwen": root / "qwen", "root": root}


def make_config(folders: dict[str, Path], **sections: dict) -> Config:
    tree: dict = {
        "model": {
            "language_model": str(folders["lm"]),
            "vision": {"kind": "clip", "path": str(folders["clip"])},
            "max_seq_len": 4096,
        },
        "train": {"micro_batch_size": 1, "global_batch_size": 128, "gradient_checkpointing": True},
        "distributed": {"zero_stage": 3, "precision": "bf16"},
    }
    for key, value in sections.items():
        tree.setdefault(key, {}).update(value)
    return validate_config(tree)


def parts(estimate: MemoryEstimate) -> dict[str, tuple[int | None, int | None]]:
    return {p.name: (p.total, p.trainable) for p in estimate.parts}


def test_7b_parameter_counts(folders: dict[str, Path]) -> None:
    estimate = estimate_memory(make_config(folders), world_size=8)
    embeddings = (VOCAB + 1) * H  # <image> added: no tokenizer in the folder, so assumed
    assert parts(estimate) == {
        "vision": (clip_l_params(), 0),
        "mm_projector": (LINEAR_PROJECTOR, LINEAR_PROJECTOR),
        "language_model": (llama_7b_params(VOCAB + 1), embeddings),
    }
    assert llama_7b_params(VOCAB) == 6_738_415_616  # the published LLaMA-2-7B count
    assert estimate.trainable_params == 135_282_688  # ~135M: the original's ViT projector + LN
    assert estimate.total_params == pytest.approx(6.74e9 + 0.30e9, rel=0.01)
    assert estimate.complete
    assert any("assumed one added token" in note for note in estimate.notes)


def test_lora_and_new_tokens_counts(folders: dict[str, Path]) -> None:
    trainable = {"language_model": "lora", "embeddings": "new_tokens"}
    estimate = estimate_memory(make_config(folders, trainable=trainable), world_size=8)
    r = 8  # default lora.language_model.r; q k v o (H->H) and gate up down (H<->INTER)
    lora = LAYERS * r * (4 * 2 * H + 3 * (H + INTER))
    assert parts(estimate)["language_model"] == (llama_7b_params(VOCAB + 1) + lora, lora)
    assert parts(estimate)["token_embed"] == (H, H)  # one new row (<image>)


def test_qwen_vit_projector_width(folders: dict[str, Path]) -> None:
    vision = {"kind": "qwen_vit", "path": str(folders["qwen"])}
    estimate = estimate_memory(make_config(folders, model={"vision": vision}), world_size=8)
    projector = 4096 * H + H + 2 * H  # Qwen's resampler outputs 4096 wide
    assert parts(estimate)["mm_projector"] == (projector, projector)
    total, trainable = parts(estimate)["vision"]
    assert trainable == 0 and 1.8e9 < total < 2.0e9  # ViT-bigG + resampler, without proj


def test_zero3_partitions_weights(folders: dict[str, Path]) -> None:
    config = make_config(folders)
    estimate = estimate_memory(config, world_size=8)
    total, trainable = estimate.total_params, estimate.trainable_params
    assert estimate.weights == pytest.approx(total * 2 / 8, rel=0.05)
    assert estimate.gradients == pytest.approx(trainable * 2 / 8, abs=1)
    assert estimate.optimizer == pytest.approx(trainable * 12 / 8, abs=1)  # 2 moments + master
    assert estimate.cpu == 0


def test_stages_are_monotonic(folders: dict[str, Path]) -> None:
    totals = [
        estimate_memory(make_config(folders, distributed={"zero_stage": s}), 8).gpu_total
        for s in (0, 1, 2, 3)
    ]
    assert totals[3] < totals[2] < totals[1] < totals[0]
    stage0 = estimate_memory(make_config(folders, distributed={"zero_stage": 0}), 8)
    assert stage0.weights == stage0.total_params * 2
    assert stage0.optimizer == stage0.trainable_params * 12
    fp32 = estimate_memory(
        make_config(folders, distributed={"zero_stage": 0, "precision": "fp32"}), 8
    )
    assert fp32.weights == fp32.total_params * 4
    assert fp32.optimizer == fp32.trainable_params * 8  # no separate master copy


def test_offload_moves_bytes_to_cpu(folders: dict[str, Path]) -> None:
    base = estimate_memory(make_config(folders), 8)
    dist = {"offload_optimizer": True, "offload_params": True}
    offloaded = estimate_memory(make_config(folders, distributed=dist), 8)
    assert offloaded.optimizer == 0
    assert offloaded.weights < base.weights / 10
    partition = base.total_params * 2 / 8
    assert offloaded.cpu == pytest.approx(base.optimizer + partition, rel=1e-6)


def test_activations(folders: dict[str, Path]) -> None:
    def acts(**sections: dict) -> int:
        return estimate_memory(make_config(folders, **sections), 8).activations

    with_ckpt, without = acts(), acts(train={"gradient_checkpointing": False})
    assert with_ckpt < without / 5
    # no checkpointing: 32 layers x 4096 tokens x (9h + 4I + h for MMCA's 2nd branch) x 2 bytes
    layers = LAYERS * 4096 * (10 * H + 4 * INTER) * 2
    assert without == pytest.approx(layers, rel=0.1)
    assert acts(train={"micro_batch_size": 2, "global_batch_size": 128}) > 1.9 * with_ckpt
    dense = acts(model={"mmca": {"impl": "dense"}})
    assert dense - with_ckpt == 2 * 4096 * 4096  # two boolean masks
    assert acts(trainable={"vision": "full"}) > with_ckpt  # vision activations now count


def test_missing_folders_give_partial_estimate(folders: dict[str, Path], tmp_path: Path) -> None:
    model = {"language_model": str(tmp_path / "no-lm")}
    estimate = estimate_memory(make_config(folders, model=model), 8)
    assert not estimate.complete
    assert parts(estimate)["vision"] == (clip_l_params(), 0)
    lm = next(p for p in estimate.parts if p.name == "language_model")
    assert lm.total is None and "no-lm not found" in lm.note
    text = "\n".join(estimate.lines())
    assert "lower bound" in text and "unknown" in text
    vision = {"kind": "clip", "path": str(tmp_path)}  # exists, no config.json
    only_lm = estimate_memory(make_config(folders, model={"vision": vision}), 8)
    assert parts(only_lm)["language_model"] == (llama_7b_params(VOCAB + 1), (VOCAB + 1) * H)
    assert "has no config.json" in next(p.note for p in only_lm.parts if p.name == "vision")
    both = {"language_model": str(tmp_path / "a"), "vision": {"path": str(tmp_path / "b")}}
    assert estimate_memory(make_config(folders, model=both), 2).total_params == 0


def test_rendering(folders: dict[str, Path]) -> None:
    estimate = estimate_memory(make_config(folders), 8)
    lines = estimate.lines()
    assert lines[0] == "memory estimate (ZeRO-3, bf16, 8 GPU(s)):"
    assert "  language_model: 6.74B params, 131.1M trainable" in lines
    gib = [line for line in lines if line.endswith("GiB")]
    assert len(gib) == 6 and all(re.search(r": \d+\.\d GiB$", line) for line in gib)
    console = Console(record=True, width=120)
    console.print(estimate.table())
    text = console.export_text()
    assert "total per GPU" in text and "mm_projector" in text and "135.3M" in text


# ----------------------------------------------------------------------------- real models


def test_counts_match_the_built_tiny_model(tmp_path: Path) -> None:
    from dsvl_cli.demo.synthetic import generate_synthetic
    from dsvl_cli.model.builder import build_model

    generate_synthetic(tmp_path, num=4, seed=0)
    model = {
        "language_model": str(tmp_path / "models/lm"),
        "vision": {"kind": "clip", "path": str(tmp_path / "models/vision")},
        "projector": "perceiver",
    }
    for trainable in ({}, {"language_model": "lora", "vision": "lora", "embeddings": "new_tokens"}):
        config = validate_config({"model": model, "trainable": trainable})
        built = build_model(config).model
        expected: dict[str, list[int]] = {}
        for name, param in built.named_parameters():
            row = expected.setdefault(name.split(".")[0], [0, 0])
            row[0] += param.numel()
            row[1] += param.numel() if param.requires_grad else 0
        estimate = estimate_memory(config, 1)
        assert parts(estimate) == {k: tuple(v) for k, v in expected.items()}
        assert not any("assumed" in note for note in estimate.notes)  # tokenizer was read


def test_open_clip_counts(tmp_path: Path) -> None:
    from dsvl_cli.model.vision_loader import build_open_clip_encoder

    spec = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 32,
            "layers": 2,
            "width": 64,
            "head_width": 16,
            "patch_size": 8,
        },
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 4, "layers": 1},
    }
    path = tmp_path / "dsvl-test-memory-vit.json"
    path.write_text(json.dumps(spec))
    encoder, _ = build_open_clip_encoder(str(path), None)
    expected = sum(p.numel() for p in encoder.parameters())
    vision = {"kind": "open_clip", "path": "weights.bin", "open_clip_model": str(path)}
    config = validate_config({"model": {"language_model": str(tmp_path / "no"), "vision": vision}})
    assert parts(estimate_memory(config, 1))["vision"] == (expected, 0)
