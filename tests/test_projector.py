"""Projectors: shapes and token counts for CLIP-like and Qwen-like features, names, init, grads."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from open_clip.pos_embed import get_2d_sincos_pos_embed
from transformers import CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from dsvl_cli.errors import ConfigError
from dsvl_cli.model.projector import PROJECTOR_KINDS, build_projector

LM_HIDDEN = 32
CLIP_CONFIG = CLIPVisionConfig(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    intermediate_size=128,
)
# (vision tokens, vision hidden, vit layer config, perceiver tokens)
CLIP_LIKE = (17, 64, CLIP_CONFIG, 16)  # 4x4 patches + CLS
QWEN_LIKE = (4, 48, None, 4)  # 4 resampler queries, no CLS


def _features(tokens: int, hidden: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, tokens, hidden, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", PROJECTOR_KINDS)
@pytest.mark.parametrize("encoder", [CLIP_LIKE, QWEN_LIKE], ids=["clip_like", "qwen_like"])
def test_shapes_tokens_and_gradients(kind: str, encoder: tuple) -> None:
    tokens, hidden, config, perceiver_tokens = encoder
    torch.manual_seed(0)
    projector = build_projector(kind, hidden, LM_HIDDEN, tokens, vision_config=config)
    expected_tokens = perceiver_tokens if kind == "perceiver" else tokens
    assert projector.num_tokens == expected_tokens
    out = projector(_features(tokens, hidden))
    assert out.shape == (2, expected_tokens, LM_HIDDEN)
    out.square().sum().backward()
    for name, param in projector.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_linear_is_linear_then_layernorm() -> None:
    projector = build_projector("linear", 64, LM_HIDDEN, 17)
    linear, norm = projector.projection
    assert norm.eps == 1e-12
    x = _features(17, 64)
    expected = torch.nn.functional.layer_norm(linear(x), (LM_HIDDEN,), eps=1e-12)
    torch.testing.assert_close(projector(x), expected * norm.weight + norm.bias)
    assert set(projector.state_dict()) == {
        "projection.0.weight",
        "projection.0.bias",
        "projection.1.weight",
        "projection.1.bias",
    }


def test_mlp_is_two_layer_gelu() -> None:
    projector = build_projector("mlp", 64, LM_HIDDEN, 17)
    first, act, second = projector.projection
    x = _features(17, 64)
    assert isinstance(act, torch.nn.GELU)
    torch.testing.assert_close(projector(x), second(torch.nn.functional.gelu(first(x))))


def test_vit_uses_clip_encoder_layer_from_config() -> None:
    before = CLIP_CONFIG._attn_implementation
    projector = build_projector("vit", 64, LM_HIDDEN, 17, vision_config=CLIP_CONFIG)
    layer = projector.vis_layer
    assert isinstance(layer, CLIPEncoderLayer)
    assert layer.layer_norm1.eps == CLIP_CONFIG.layer_norm_eps
    assert layer.mlp.fc1.out_features == 128
    assert projector.projection[1].eps == 1e-12
    # The layer gets its own config copy; the encoder's config is left as it was.
    assert layer.self_attn.config is not CLIP_CONFIG
    assert layer.self_attn.config._attn_implementation == "sdpa"
    assert CLIP_CONFIG._attn_implementation == before
    with pytest.raises(ValueError, match="hidden_size 64"):
        build_projector("vit", 48, LM_HIDDEN, 4, vision_config=CLIP_CONFIG)


def test_perceiver_table_is_a_fixed_buffer() -> None:
    projector = build_projector("perceiver", 64, LM_HIDDEN, 17)
    assert "pos_embed" not in {name for name, _ in projector.named_parameters()}
    assert all(p is not projector.pos_embed for p in projector.parameters())
    assert "pos_embed" in projector.state_dict()
    reference = torch.from_numpy(get_2d_sincos_pos_embed(LM_HIDDEN, 4)).float()
    torch.testing.assert_close(projector.pos_embed, reference)
    projector(_features(17, 64)).sum().backward()
    assert projector.pos_embed.grad is None


def test_perceiver_names_and_init_follow_original() -> None:
    torch.manual_seed(0)
    projector = build_projector("perceiver", 64, 256, 17)
    assert set(projector.state_dict()) == {
        "pos_embed",
        "query",
        "kv_proj.weight",
        "kv_proj.bias",
        "attn.in_proj_weight",
        "attn.in_proj_bias",
        "attn.out_proj.weight",
        "attn.out_proj.bias",
        "ln_q.weight",
        "ln_q.bias",
        "ln_kv.weight",
        "ln_kv.bias",
        "projection.0.weight",
        "projection.0.bias",
        "projection.1.weight",
        "projection.1.bias",
    }
    assert projector.attn.num_heads == 2  # lm_hidden // 128
    assert projector.ln_q.eps == projector.ln_kv.eps == projector.projection[0].eps == 1e-12
    assert torch.all(projector.kv_proj.bias == 0) and torch.all(projector.projection[1].bias == 0)
    assert torch.all(projector.ln_q.weight == 1) and torch.all(projector.projection[0].weight == 1)
    assert 0.015 < projector.query.std().item() < 0.025
    assert 0.015 < projector.kv_proj.weight.std().item() < 0.025


def test_perceiver_drops_cls_and_resizes_keys() -> None:
    torch.manual_seed(0)
    projector = build_projector("perceiver", 64, LM_HIDDEN, 17, num_queries=4)
    assert projector.num_tokens == 4 and projector.pos_embed.shape == (4, LM_HIDDEN)
    x = _features(17, 64)
    changed = x.clone()
    changed[:, 0] = 100.0  # the CLS token must not matter
    with torch.no_grad():
        out = projector(x)
        assert out.shape == (2, 4, LM_HIDDEN)
        torch.testing.assert_close(projector(changed), out)


def test_build_errors() -> None:
    with pytest.raises(ConfigError, match="unknown projector.kind 'baseline'"):
        build_projector("baseline", 64, LM_HIDDEN, 17)
    with pytest.raises(ConfigError, match="square patch grid"):
        build_projector("perceiver", 64, LM_HIDDEN, 11)
    with pytest.raises(ConfigError, match="square number"):
        build_projector("perceiver", 64, LM_HIDDEN, 17, num_queries=5)
    with pytest.raises(ConfigError, match="perceiver' only"):
        build_projector("linear", 64, LM_HIDDEN, 17, num_queries=4)
