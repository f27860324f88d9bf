"""Vision encoders: clip / open_clip / qwen_vit loading, shapes, key names, and error messages."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.pos_embed import get_2d_sincos_pos_embed
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from dsvl_cli.errors import CheckpointError, ConfigError
from dsvl_cli.model.qwen_vit import QwenViT, QwenViTConfig, sincos_2d_table
from dsvl_cli.model.vision_loader import (
    build_open_clip_encoder,
    load_vision_encoder,
    save_qwen_vit_folder,
)

TINY_QWEN = QwenViTConfig(
    image_size=28,
    patch_size=14,
    width=32,
    layers=2,
    heads=4,
    mlp_size=64,
    n_queries=4,
    output_dim=48,
    output_heads=4,
)
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 4, "layers": 1},
}


def _image(seed: int = 0, size: tuple[int, int] = (40, 36)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


def _pixels(n: int, side: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CLIPVisionModel]:
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        intermediate_size=128,
    )
    model = CLIPVisionModel(config).eval()
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(folder)
    return folder, model


def qwen_expected_keys(config: QwenViTConfig) -> set[str]:
    """The Qwen-VL `transformer.visual.*` keys (prefix stripped, proj dropped)."""
    keys = {"conv1.weight", "positional_embedding", "ln_pre.weight", "ln_pre.bias"}
    for i in range(config.layers):
        block = f"transformer.resblocks.{i}"
        for part in ("ln_1", "ln_2", "attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"):
            keys |= {f"{block}.{part}.weight", f"{block}.{part}.bias"}
    keys |= {
        "attn_pool.query",
        "attn_pool.pos_embed",
        "attn_pool.kv_proj.weight",
        "attn_pool.attn.in_proj_weight",
        "attn_pool.attn.in_proj_bias",
        "attn_pool.attn.out_proj.weight",
        "attn_pool.attn.out_proj.bias",
        "attn_pool.ln_q.weight",
        "attn_pool.ln_q.bias",
        "attn_pool.ln_kv.weight",
        "attn_pool.ln_kv.bias",
        "ln_post.weight",
        "ln_post.bias",
    }
    return keys


@pytest.fixture()
def qwen_model() -> QwenViT:
    torch.manual_seed(0)
    return QwenViT(TINY_QWEN).eval()


# ---------------------------------------------------------------- clip


def test_clip_features_are_last_hidden_state(clip_folder: tuple[Path, CLIPVisionModel]) -> None:
    folder, reference = clip_folder
    encoder, transform = load_vision_encoder("clip", str(folder))
    encoder.eval()
    assert (encoder.num_tokens, encoder.hidden_size, encoder.image_size) == (17, 64, 32)
    assert encoder.has_cls_token
    pixels = _pixels(2, 32)
    with torch.no_grad():
        feats = encoder(pixels)
        expected = reference(pixel_values=pixels).last_hidden_state
    assert feats.shape == (2, 17, 64)
    torch.testing.assert_close(feats, expected, rtol=0, atol=0)
    image = _image()
    tensor = transform(image)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    processor = CLIPImageProcessor.from_pretrained(folder)
    torch.testing.assert_close(tensor, processor(images=image, return_tensors="pt").pixel_values[0])
    assert encoder.image_processor is not None
    assert encoder.image_processor.crop_size == {"height": 32, "width": 32}


def test_clip_gradient_checkpointing_passthrough(
    clip_folder: tuple[Path, CLIPVisionModel],
) -> None:
    encoder, _ = load_vision_encoder("clip", str(clip_folder[0]))
    encoder.gradient_checkpointing_enable()
    assert any(getattr(m, "gradient_checkpointing", False) for m in encoder.model.modules())
    encoder.train()
    encoder(_pixels(1, 32)).sum().backward()
    assert encoder.model.embeddings.patch_embedding.weight.grad is not None


def test_clip_dtype(clip_folder: tuple[Path, CLIPVisionModel]) -> None:
    encoder, _ = load_vision_encoder("clip", str(clip_folder[0]), dtype=torch.bfloat16)
    assert encoder.dtype == torch.bfloat16


def test_clip_folder_errors(
    clip_folder: tuple[Path, CLIPVisionModel], tmp_path: Path, qwen_model: QwenViT
) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_vision_encoder("clip", str(tmp_path / "nowhere"))
    with pytest.raises(
        CheckpointError, match=r"has no config\.json.*CLIPVisionModel.*save_pretrained"
    ):
        load_vision_encoder("clip", str(tmp_path))
    (tmp_path / "config.json").write_text((clip_folder[0] / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"has no model\.safetensors"):
        load_vision_encoder("clip", str(tmp_path))
    qwen_folder = tmp_path / "qwen"
    save_qwen_vit_folder(qwen_folder, TINY_QWEN, qwen_model.state_dict())
    with pytest.raises(CheckpointError, match="'dsvl_qwen_vit' model, not CLIP"):
        load_vision_encoder("clip", str(qwen_folder))
    with pytest.raises(ConfigError, match="unknown vision kind 'siglip'"):
        load_vision_encoder("siglip", str(qwen_folder))


# ---------------------------------------------------------------- open_clip


@pytest.fixture(scope="module")
def open_clip_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("oc") / "dsvl-test-tiny-vit.json"
    path.write_text(json.dumps(TINY_OPEN_CLIP))
    return path


def test_open_clip_random_init_shapes(open_clip_json: Path) -> None:
    encoder, transform = build_open_clip_encoder(str(open_clip_json), None)
    assert (encoder.num_tokens, encoder.hidden_size, encoder.image_size) == (17, 64, 32)
    with torch.no_grad():
        assert encoder.eval()(_pixels(3, 32)).shape == (3, 17, 64)
    assert transform(_image()).shape == (3, 32, 32)
    layer = encoder.layer_config
    assert (layer.hidden_size, layer.num_attention_heads, layer.intermediate_size) == (64, 4, 256)
    # ln_post and proj are pruned: every remaining parameter is used by forward.
    assert encoder.visual.proj is None
    assert not any(p.requires_grad and "ln_post" in n for n, p in encoder.named_parameters())


def test_open_clip_loads_weights_file(open_clip_json: Path, tmp_path: Path) -> None:
    open_clip.add_model_config(open_clip_json)
    torch.manual_seed(1)
    reference = open_clip.create_model(open_clip_json.stem, pretrained=None).eval()
    weights = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(reference.state_dict(), weights)
    encoder, _ = load_vision_encoder("open_clip", str(weights), open_clip_model=str(open_clip_json))
    pixels = _pixels(2, 32)
    visual = reference.visual
    with torch.no_grad():
        feats = encoder.eval()(pixels)
        # All tokens after the last block, CLS first, no ln_post (reference built by hand).
        expected = visual.transformer(visual._embeds(pixels))
    torch.testing.assert_close(feats, expected)


def test_open_clip_errors(open_clip_json: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs open_clip_model"):
        load_vision_encoder("open_clip", str(open_clip_json))
    with pytest.raises(
        CheckpointError,
        match=r"w\.bin not found; the vision path must be a local open_clip checkpoint",
    ):
        load_vision_encoder("open_clip", str(tmp_path / "w.bin"), open_clip_model="ViT-B-32")
    weights = tmp_path / "w.bin"
    torch.save({"bogus": torch.zeros(1)}, weights)
    with pytest.raises(ConfigError, match="unknown open_clip model 'ViT-Nope'"):
        load_vision_encoder("open_clip", str(weights), open_clip_model="ViT-Nope")
    with pytest.raises(CheckpointError, match="does not load into open_clip"):
        load_vision_encoder("open_clip", str(weights), open_clip_model=str(open_clip_json))


# ---------------------------------------------------------------- qwen_vit


def test_qwen_forward_shape_and_key_names(qwen_model: QwenViT) -> None:
    with torch.no_grad():
        assert qwen_model(_pixels(2, 28)).shape == (2, 4, 48)
    state = qwen_model.state_dict()
    assert set(state) == qwen_expected_keys(TINY_QWEN)
    assert state["positional_embedding"].shape == (256, 32)
    assert state["conv1.weight"].shape == (32, 3, 14, 14)
    assert state["transformer.resblocks.0.attn.in_proj.weight"].shape == (96, 32)
    fresh = {k: torch.randn_like(v) for k, v in state.items()}
    QwenViT(TINY_QWEN).load_state_dict(fresh, strict=True)


def test_qwen_no_kv_proj_when_widths_match() -> None:
    config = QwenViTConfig(**{**TINY_QWEN.__dict__, "output_dim": 32})
    keys = set(QwenViT(config).state_dict())
    assert keys == qwen_expected_keys(config) - {"attn_pool.kv_proj.weight"}


def test_qwen_pos_embed_is_fixed_sincos(qwen_model: QwenViT) -> None:
    names = {name for name, _ in qwen_model.named_parameters()}
    assert "attn_pool.pos_embed" not in names
    assert not qwen_model.attn_pool.pos_embed.requires_grad
    reference = torch.from_numpy(get_2d_sincos_pos_embed(48, 2)).float()
    torch.testing.assert_close(qwen_model.attn_pool.pos_embed, reference)
    torch.testing.assert_close(
        sincos_2d_table(64, 16), torch.from_numpy(get_2d_sincos_pos_embed(64, 16)).float()
    )


def _reference_visual_attention(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Qwen-VL's VisualAttention.forward, transcribed (sequence-first, bmm)."""
    x = x.transpose(0, 1)  # [L, N, W]
    sq, b, width = x.shape
    heads, hd = attn.heads, width // attn.heads
    mixed = attn.in_proj(x).view(sq, b, heads, 3 * hd)
    q, k, v = mixed.split(hd, dim=-1)
    q = q.reshape(sq, b * heads, hd).transpose(0, 1)
    k = k.reshape(sq, b * heads, hd).transpose(0, 1)
    v = v.reshape(sq, b * heads, hd).transpose(0, 1)
    probs = torch.bmm(q / math.sqrt(hd), k.transpose(-2, -1)).softmax(dim=-1)
    ctx = torch.bmm(probs, v).view(b, heads, sq, hd).permute(2, 0, 1, 3).reshape(sq, b, width)
    return attn.out_proj(ctx).transpose(0, 1)


def _reference_resampler(pool: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Qwen-VL's Resampler.forward, transcribed (sequence-first MultiheadAttention)."""
    mha = torch.nn.MultiheadAttention(pool.query.shape[1], pool.attn.num_heads)
    mha.load_state_dict(pool.attn.state_dict())
    src = int(math.sqrt(pool.pos_embed.shape[0]))
    tgt = int(math.sqrt(x.shape[1]))
    grid = pool.pos_embed.reshape(1, src, src, -1).permute(0, 3, 1, 2)
    key_pos = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    key_pos = key_pos.permute(0, 2, 3, 1).flatten(0, 2)
    kv = pool.ln_kv(pool.kv_proj(x)).permute(1, 0, 2)
    q = pool.ln_q(pool.query).unsqueeze(1).repeat(1, kv.shape[1], 1)
    out = mha(q + pool.pos_embed.unsqueeze(1), kv + key_pos.unsqueeze(1), kv)[0]
    return out.permute(1, 0, 2)


def test_qwen_blocks_match_original_formulas(qwen_model: QwenViT) -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 4, 32)
    attn = qwen_model.transformer.resblocks[0].attn
    with torch.no_grad():
        torch.testing.assert_close(attn(x), _reference_visual_attention(attn, x))
        patches = torch.randn(2, 16, 32)  # a 4x4 grid, queries on a 2x2 grid: keys get resized
        pool = qwen_model.attn_pool
        torch.testing.assert_close(pool(patches), _reference_resampler(pool, patches))


def test_qwen_gradient_checkpointing_same_grads(qwen_model: QwenViT) -> None:
    pixels = _pixels(2, 28)
    qwen_model.train()
    qwen_model(pixels).square().sum().backward()
    plain = [p.grad.clone() for p in qwen_model.parameters()]
    qwen_model.zero_grad()
    qwen_model.gradient_checkpointing_enable()
    qwen_model(pixels).square().sum().backward()
    for before, p in zip(plain, qwen_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, before)


def test_qwen_config_json_roundtrip(tmp_path: Path) -> None:
    TINY_QWEN.to_json(tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "dsvl_qwen_vit" and data["output_heads"] == 4
    assert QwenViTConfig.from_json(tmp_path / "config.json") == TINY_QWEN
    data["model_type"] = "clip_vision_model"
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="extract-qwen"):
        QwenViTConfig.from_json(tmp_path / "config.json")


def test_qwen_defaults_are_qwen_vl() -> None:
    config = QwenViTConfig()
    assert (config.image_size, config.width, config.layers, config.heads) == (448, 1664, 48, 16)
    assert (config.mlp_size, config.n_queries, config.output_dim, config.output_heads) == (
        8192,
        256,
        4096,
        32,
    )
    processor = config.image_processor()
    assert processor.crop_size == {"height": 448, "width": 448}
    assert processor.resample == 3


def test_qwen_folder_roundtrip_safetensors(qwen_model: QwenViT, tmp_path: Path) -> None:
    save_qwen_vit_folder(tmp_path, TINY_QWEN, qwen_model.state_dict())
    assert {p.name for p in tmp_path.iterdir()} == {
        "config.json",
        "preprocessor_config.json",
        "model.safetensors",
    }
    encoder, transform = load_vision_encoder("qwen_vit", str(tmp_path))
    assert (encoder.num_tokens, encoder.hidden_size, encoder.image_size) == (4, 48, 28)
    assert not encoder.has_cls_token
    pixels = _pixels(2, 28)
    with torch.no_grad():
        torch.testing.assert_close(encoder.eval()(pixels), qwen_model(pixels), rtol=0, atol=0)
    assert transform(_image()).shape == (3, 28, 28)
    assert not encoder.model.attn_pool.pos_embed.requires_grad
    assert all(p.device.type == "cpu" for p in encoder.parameters())


def test_qwen_folder_bin_and_dtype(qwen_model: QwenViT, tmp_path: Path) -> None:
    TINY_QWEN.to_json(tmp_path / "config.json")
    TINY_QWEN.image_processor().save_pretrained(tmp_path)
    torch.save(qwen_model.state_dict(), tmp_path / "pytorch_model.bin")
    encoder, _ = load_vision_encoder("qwen_vit", str(tmp_path))
    pixels = _pixels(1, 28)
    with torch.no_grad():
        torch.testing.assert_close(encoder.eval()(pixels), qwen_model(pixels), rtol=0, atol=0)
    half, _ = load_vision_encoder("qwen_vit", str(tmp_path), dtype=torch.bfloat16)
    assert {t.dtype for t in half.state_dict().values()} == {torch.bfloat16}


def test_qwen_folder_errors(qwen_model: QwenViT, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"has no config\.json.*extract-qwen"):
        load_vision_encoder("qwen_vit", str(tmp_path))
    TINY_QWEN.to_json(tmp_path / "config.json")
    TINY_QWEN.image_processor().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"has no model\.safetensors or pytorch_model\.bin"):
        load_vision_encoder("qwen_vit", str(tmp_path))
    state = dict(qwen_model.state_dict())
    del state["ln_post.weight"]
    state["proj"] = torch.zeros(48, 48)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(
        CheckpointError, match=r"missing 1 \(e\.g\. ln_post\.weight\).*unexpected 1"
    ):
        load_vision_encoder("qwen_vit", str(tmp_path))


def test_qwen_original_helper_folder_uses_qwen_vl_defaults(
    qwen_model: QwenViT, tmp_path: Path
) -> None:
    legacy = {"model_type": "clip", "vision_config": {"hidden_size": 1664, "image_size": 224}}
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    TINY_QWEN.image_processor().save_pretrained(tmp_path)
    torch.save(qwen_model.state_dict(), tmp_path / "pytorch_model.bin")
    # The tiny weights cannot fill the 1664-wide default tower: proof the defaults were chosen.
    with pytest.raises(CheckpointError, match=r"in_proj_weight \(144, 48\) != \(12288, 4096\)"):
        load_vision_encoder("qwen_vit", str(tmp_path))
