"""MMCA attention: dense and flex kernels against a slow reference, inside real HF decoders."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig, Qwen2Config

from dsvl_cli.bench import mmca as bench
from dsvl_cli.model.hf_compat import cache_kwargs, output_cache
from dsvl_cli.model.mmca import (
    IMAGE,
    MMCA_ATTN_NAME,
    PAD,
    TEXT,
    build_mmca_masks,
    mmca_attention,
    register_mmca,
)

REF_ATTN_NAME = "dsvl_test_mmca_reference"
FLEX_CPU_WARNING = "ignore:flex_attention called without torch.compile"

# Row 0: text before the first image, two images, right padding.
# Row 1: starts with an image (image queries with no earlier text), ends with text.
# Row 2: text only, right padding (the image branch is empty everywhere).
MODALITY = torch.tensor(
    [
        [1, 1, 1, 2, 2, 2, 1, 1, 2, 2, 1, 1, 1, 0, 0, 0],
        [2, 2, 1, 1, 2, 2, 2, 1, 1, 1, 1, 2, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
    ]
)


def reference_mmca(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    modality: torch.Tensor,
    scale: float,
    image_attends_text: bool = True,
) -> torch.Tensor:
    """The MMCA table with explicit loops, in float64; returns [B, Hq, Lq, D]."""
    query, key, value = query.double(), key.double(), value.double()
    batch, num_q_heads, q_len, _ = query.shape
    kv_len, repeats = key.shape[2], num_q_heads // key.shape[1]
    rows = []
    for b in range(batch):
        for h in range(num_q_heads):
            kv_head = h // repeats
            for i in range(q_len):
                pos = kv_len - q_len + i
                kind = int(modality[b, pos])
                earlier = modality[b, : pos + 1].tolist()
                image_keys, text_keys = [], []
                if kind == TEXT:
                    image_keys = [j for j, m in enumerate(earlier) if m == IMAGE]
                    text_keys = [j for j, m in enumerate(earlier) if m == TEXT]
                elif kind == IMAGE:
                    image_keys = [pos]
                    if image_attends_text:
                        text_keys = [j for j, m in enumerate(earlier) if m == TEXT]
                row = torch.zeros_like(query[b, h, i])
                for keys in (image_keys, text_keys):
                    if keys:
                        scores = key[b, kv_head, keys] @ query[b, h, i] * scale
                        row = row + torch.softmax(scores, dim=0) @ value[b, kv_head, keys]
                rows.append(row)
    return torch.stack(rows).reshape(query.shape)


def reference_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """`reference_mmca` with transformers' attention-function signature (for whole models)."""
    iat = getattr(module.config, "mmca_image_attends_text", True)
    out = reference_mmca(query, key, value, kwargs["modality_ids"], scaling, iat)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


@pytest.fixture(scope="module", autouse=True)
def _registered() -> None:
    register_mmca()
    AttentionInterface.register(REF_ATTN_NAME, reference_attention)


def random_qkv(q_len: int, kv_len: int, *, grad: bool = False, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    batch = MODALITY.shape[0]
    query = torch.randn(batch, 4, q_len, 8, generator=gen, requires_grad=grad)
    key = torch.randn(batch, 2, kv_len, 8, generator=gen, requires_grad=grad)
    value = torch.randn(batch, 2, kv_len, 8, generator=gen, requires_grad=grad)
    return query, key, value


# ----------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("image_attends_text", [True, False])
@pytest.mark.parametrize("q_len", [16, 5, 1])
def test_dense_matches_reference(image_attends_text: bool, q_len: int) -> None:
    query, key, value = random_qkv(q_len, 16)
    masks = build_mmca_masks(MODALITY, q_len, image_attends_text=image_attends_text, impl="dense")
    out, weights = mmca_attention(None, query, key, value, None, scaling=0.3, mmca_masks=masks)
    expected = reference_mmca(query, key, value, MODALITY, 0.3, image_attends_text)
    assert weights is None
    assert out.shape == (3, q_len, 4, 8)
    torch.testing.assert_close(out.transpose(1, 2).double(), expected, atol=1e-5, rtol=0)


def test_empty_branches_contribute_exactly_zero() -> None:
    query, key, value = random_qkv(16, 16)
    masks = build_mmca_masks(MODALITY, image_attends_text=False, impl="dense")
    out = mmca_attention(None, query, key, value, None, mmca_masks=masks)[0].transpose(1, 2)
    assert torch.equal(out[0, :, 13:], torch.zeros_like(out[0, :, 13:]))  # pad queries
    # An image query without text attention outputs exactly its own value.
    assert torch.equal(out[1, :, 0], value[1, :, 0].repeat_interleave(2, dim=0))
    # Text before the first image: only the text branch (no leak of future images).
    text_only = F.scaled_dot_product_attention(
        query[:1, :, :3], key[:1, :, :3], value[:1, :, :3], is_causal=True, enable_gqa=True
    )
    torch.testing.assert_close(out[:1, :, :3], text_only, atol=1e-6, rtol=0)


def test_gradients_match_reference_and_are_finite() -> None:
    query, key, value = random_qkv(16, 16, grad=True)
    masks = build_mmca_masks(MODALITY, impl="dense")
    out = mmca_attention(None, query, key, value, None, scaling=0.3, mmca_masks=masks)[0]
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * weights).sum(), (query, key, value))
    expected_out = reference_mmca(query, key, value, MODALITY, 0.3).transpose(1, 2)
    expected = torch.autograd.grad((expected_out * weights.double()).sum(), (query, key, value))
    for got, want in zip(grads, expected, strict=True):
        assert torch.isfinite(got).all()
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # want: float64 math, cast


def test_all_text_equals_causal_sdpa() -> None:
    gen = torch.Generator().manual_seed(2)
    query = torch.randn(2, 4, 12, 8, generator=gen)
    key, value = torch.randn(2, 2, 2, 12, 8, generator=gen)
    masks = build_mmca_masks(torch.full((2, 12), TEXT), impl="dense")
    out = mmca_attention(None, query, key, value, None, mmca_masks=masks)[0]
    causal = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, causal.transpose(1, 2), atol=1e-6, rtol=0)


@pytest.mark.filterwarnings(FLEX_CPU_WARNING)
@pytest.mark.parametrize("q_len", [16, 5])
def test_flex_forward_matches_dense_on_cpu(q_len: int) -> None:
    query, key, value = random_qkv(q_len, 16)
    outs = [
        mmca_attention(
            None, query, key, value, None, mmca_masks=build_mmca_masks(MODALITY, q_len, impl=i)
        )[0]
        for i in ("flex", "dense")
    ]
    assert build_mmca_masks(MODALITY, q_len, impl="flex").impl == "flex"
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)


def test_dense_masks_leave_no_row_empty_for_sdpa() -> None:
    # CPU SDPA returns 0 for an all-masked row, but other kernels may return NaN: the dense masks
    # give such rows a dummy key and the has_*_keys flags zero them afterwards.
    masks = build_mmca_masks(MODALITY, impl="dense")
    for branch, has_keys in (
        (masks.image_branch, masks.has_image_keys),
        (masks.text_branch, masks.has_text_keys),
    ):
        assert branch.any(dim=-1).all()
        assert not has_keys.all() and has_keys.any()
    assert not masks.has_image_keys[0, 0, :3].any()  # text before the first image


def test_keys_past_the_modality_ids_are_ignored() -> None:
    # A static cache hands over all its slots; the unfilled ones hold garbage.
    query, key, value = random_qkv(5, 16)
    masks = build_mmca_masks(MODALITY, 5)
    padded = [torch.cat([t, torch.full_like(t[:, :, :4], 1e4)], dim=2) for t in (key, value)]
    out = mmca_attention(None, query, key, value, None, mmca_masks=masks)[0]
    assert torch.equal(mmca_attention(None, query, *padded, None, mmca_masks=masks)[0], out)


def test_auto_is_dense_on_cpu() -> None:
    assert build_mmca_masks(MODALITY).impl == "dense"


def test_modality_ids_fallback_reads_module_config() -> None:
    query, key, value = random_qkv(16, 16)
    module = torch.nn.Module()
    module.config = LlamaConfig(mmca_image_attends_text=False)
    out = mmca_attention(module, query, key, value, None, modality_ids=MODALITY)[0]
    masks = build_mmca_masks(MODALITY, image_attends_text=False)
    assert torch.equal(out, mmca_attention(None, query, key, value, None, mmca_masks=masks)[0])


def test_bad_calls_raise_clear_errors() -> None:
    query, key, value = random_qkv(16, 16)
    with pytest.raises(ValueError, match="needs modality ids"):
        mmca_attention(None, query, key, value, None)
    with pytest.raises(ValueError, match="pass modality ids for every key"):
        mmca_attention(None, query, key, value, None, mmca_masks=build_mmca_masks(MODALITY, 4))
    with pytest.raises(ValueError, match="integer tensor"):
        build_mmca_masks(MODALITY.float())
    with pytest.raises(ValueError, match="q_len"):
        build_mmca_masks(MODALITY, 17)
    with pytest.raises(ValueError, match="sliding_window"):
        mmca_attention(None, query, key, value, None, modality_ids=MODALITY, sliding_window=8)


# ----------------------------------------------------------------------------- whole decoders


def tiny_lm(family: str, attn: str) -> torch.nn.Module:
    """A tiny random decoder with GQA (4 heads, 2 kv heads); same weights for the same family."""
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    config = config_cls(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        initializer_range=0.2,  # large enough that attention patterns change the logits
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def random_embeds(seed: int = 3) -> torch.Tensor:
    return torch.randn(*MODALITY.shape, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_decoder_matches_reference_and_differs_from_causal(family: str) -> None:
    model, embeds = tiny_lm(family, MMCA_ATTN_NAME), random_embeds()
    with torch.no_grad():
        logits = model(inputs_embeds=embeds, mmca_masks=build_mmca_masks(MODALITY)).logits
        model.set_attn_implementation(REF_ATTN_NAME)
        expected = model(inputs_embeds=embeds, modality_ids=MODALITY).logits
        model.set_attn_implementation("sdpa")
        causal = model(inputs_embeds=embeds).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert (logits[:2] - causal[:2]).abs().max() > 1e-2  # the test can tell MMCA from causal


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_all_text_decoder_equals_sdpa(family: str) -> None:
    model = tiny_lm(family, MMCA_ATTN_NAME)
    embeds = random_embeds()[:2, :12]
    with torch.no_grad():
        mmca = model(inputs_embeds=embeds, modality_ids=torch.full((2, 12), TEXT)).logits
        model.set_attn_implementation("sdpa")
        causal = model(inputs_embeds=embeds).logits
    torch.testing.assert_close(mmca, causal, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_kv_cache_decoding_matches_full_forward(family: str) -> None:
    model, embeds = tiny_lm(family, MMCA_ATTN_NAME), random_embeds()
    prefix = 9  # the last 7 positions are decoded: images, text and pads
    with torch.no_grad():
        full = model(inputs_embeds=embeds, mmca_masks=build_mmca_masks(MODALITY)).logits
        out = model(
            inputs_embeds=embeds[:, :prefix],
            mmca_masks=build_mmca_masks(MODALITY[:, :prefix]),
            use_cache=True,
        )
        steps = [out.logits]
        for t in range(prefix, MODALITY.shape[1]):  # decoding is sequential by nature
            out = model(
                inputs_embeds=embeds[:, t : t + 1],
                **cache_kwargs(output_cache(out)),
                modality_ids=MODALITY[:, : t + 1],  # the fallback builds the q_len=1 masks
                use_cache=True,
            )
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    model, embeds = tiny_lm("llama", MMCA_ATTN_NAME).train(), random_embeds()
    labels = torch.randint(0, 100, MODALITY.shape, generator=torch.Generator().manual_seed(4))
    labels = labels.masked_fill(MODALITY == PAD, -100)

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        out = model(inputs_embeds=embeds, labels=labels, mmca_masks=build_mmca_masks(MODALITY))
        out.loss.backward()
        params = model.named_parameters()
        return {name: p.grad.clone() for name, p in params if p.grad is not None}

    plain = gradients()
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)()
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    assert plain["model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=0, msg=name)


# ----------------------------------------------------------------------------- benchmark, GPU


def test_benchmark_tiny_reports_both_rows(capsys: pytest.CaptureFixture[str]) -> None:
    results = bench.main(["--tiny", "--steps", "1", "--warmup", "0"])
    assert [r.impl for r in results] == ["sdpa", MMCA_ATTN_NAME]
    assert results[1].kernel == "mmca dense"
    assert all(r.tokens_per_s > 0 for r in results)
    printed = capsys.readouterr().out
    assert "dsvl_mmca" in printed and "sdpa" in printed and "MMCA/SDPA" in printed


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def cuda_modality(layout: str, length: int) -> torch.Tensor:
    """Scattered single image tokens (many partial blocks) or contiguous image blocks."""
    if layout == "blocks":
        modality = bench.modality_layout(length, 3, 64, 2, torch.device("cpu")).clone()
    else:
        gen = torch.Generator().manual_seed(5)
        modality = torch.where(torch.rand(2, length, generator=gen) < 0.5, IMAGE, TEXT)
        modality[0, :7] = TEXT
    modality[1, -20:] = PAD
    return modality.cuda()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("layout", ["scattered", "blocks"])
def test_flex_matches_dense_on_cuda_bf16(layout: str) -> None:
    length = 300  # not a multiple of the 128 block size
    modality = cuda_modality(layout, length)
    gen = torch.Generator().manual_seed(6)
    shapes = ((2, 8, length, 64), (2, 2, length, 64), (2, 2, length, 64))
    leaves = [torch.randn(s, generator=gen).cuda().bfloat16().requires_grad_() for s in shapes]
    fp32_leaves = [t.detach().float().requires_grad_() for t in leaves]
    results = []
    for impl, tensors in (("flex", leaves), ("dense", fp32_leaves)):
        masks = build_mmca_masks(modality, impl=impl)
        out = mmca_attention(None, *tensors, None, mmca_masks=masks)[0]
        grads = torch.autograd.grad(out.float().square().sum(), tensors)
        results.append((out.float(), *(g.float() for g in grads)))
    assert build_mmca_masks(modality).impl == "flex"
    for got, want in zip(*results, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)
    assert torch.equal(results[0][0][1, -20:], torch.zeros_like(results[0][0][1, -20:]))


@pytest.mark.gpu
@needs_cuda
def test_decoder_flex_matches_dense_on_cuda_bf16() -> None:
    model = tiny_lm("llama", MMCA_ATTN_NAME).cuda().bfloat16().train()
    modality = cuda_modality("blocks", 300)
    gen = torch.Generator().manual_seed(7)
    embeds = torch.randn(2, 300, 64, generator=gen).cuda().bfloat16()
    results = []
    for impl in ("auto", "dense"):
        leaf = embeds.clone().requires_grad_()
        masks = build_mmca_masks(modality, impl=impl)
        logits = model(inputs_embeds=leaf, mmca_masks=masks).logits.float()
        (grad,) = torch.autograd.grad(logits.square().mean(), leaf)
        results.append((logits, grad.float()))
    for got, want in zip(*results, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)
