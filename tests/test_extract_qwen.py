"""extract-qwen: a tiny synthetic Qwen-VL checkpoint (real key names) -> a qwen_vit folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsvl_cli.errors import CheckpointError
from dsvl_cli.model.qwen_vit import QwenViT, QwenViTConfig
from dsvl_cli.model.vision_loader import load_vision_encoder
from dsvl_cli.tools import extract_qwen as module
from dsvl_cli.tools.extract_qwen import ExtractResult, extract_qwen, read_qwen_vl_config

# The layout of Qwen-VL-Chat's config.json `visual` section (the real one has no n_queries).
TINY_VISUAL = {
    "heads": 4,
    "image_size": 28,
    "image_start_id": 151857,
    "layers": 2,
    "mlp_ratio": 2.0,
    "n_queries": 4,
    "output_dim": 128,  # Qwen-VL's resampler has output_dim // 128 heads
    "patch_size": 14,
    "width": 32,
}
TINY_CONFIG = QwenViTConfig(
    image_size=28,
    patch_size=14,
    width=32,
    layers=2,
    heads=4,
    mlp_size=64,
    n_queries=4,
    output_dim=128,
    output_heads=1,
)
LM_TENSORS = {
    "transformer.wte.weight": (40, 16),
    "transformer.h.0.ln_1.weight": (16,),
    "transformer.h.0.attn.c_attn.weight": (48, 16),
    "transformer.ln_f.weight": (16,),
    "lm_head.weight": (40, 16),
}


def visual_tensors() -> dict[str, torch.Tensor]:
    """A tiny tower's weights in bf16 (as released), prefixed, plus Qwen's final `proj`."""
    torch.manual_seed(0)
    state = {
        f"transformer.visual.{k}": v.to(torch.bfloat16)
        for k, v in QwenViT(TINY_CONFIG).state_dict().items()
    }
    state["transformer.visual.proj"] = torch.randn(128, 128, dtype=torch.bfloat16)
    return state


def lm_tensors() -> dict[str, torch.Tensor]:
    return {k: torch.randn(shape, dtype=torch.bfloat16) for k, shape in LM_TENSORS.items()}


def write_checkpoint(root: Path, fmt: str, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `state` (default: visual + LM) as Qwen-VL does: 3 shards + index, or one file.

    Shard 1: LM embeddings, block 0, half of the visual tensors; shard 2: the other half and
    `proj`; shard 3: LM tensors only.
    """
    root.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "qwen", "architectures": ["QWenLMHeadModel"], "visual": TINY_VISUAL}
    (root / "config.json").write_text(json.dumps(config), encoding="utf-8")
    state = state if state is not None else {**visual_tensors(), **lm_tensors()}
    if fmt == "single":
        save_file(state, root / "model.safetensors")
        return root
    visual = [k for k in state if k.startswith("transformer.visual.")]
    lm = [k for k in state if k not in visual]
    groups = [lm[:3] + visual[: len(visual) // 2], visual[len(visual) // 2 :], lm[3:]]
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    weight_map = {}
    for i, keys in enumerate(groups, start=1):
        name = f"{stem}-{i:05d}-of-{len(groups):05d}.{ext}"
        shard = {k: state[k] for k in keys}
        if fmt == "safetensors":
            save_file(shard, root / name, metadata={"format": "pt"})
        else:
            torch.save(shard, root / name)
        weight_map.update(dict.fromkeys(keys, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (root / f"{stem}.{ext}.index.json").write_text(json.dumps(index), encoding="utf-8")
    return root


@pytest.fixture
def spy_safe_open(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Record which files extract-qwen opens and which tensors it fetches from them."""
    calls: dict[str, list[str]] = {"opened": [], "fetched": []}

    class Handle:
        def __init__(self, path: Path, **kwargs: str) -> None:
            calls["opened"].append(Path(path).name)
            self.inner = safe_open(path, **kwargs)

        def __enter__(self) -> Handle:
            self.inner.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.inner.__exit__(*exc)

        def keys(self) -> list[str]:
            return self.inner.keys()

        def get_tensor(self, key: str) -> torch.Tensor:
            calls["fetched"].append(key)
            return self.inner.get_tensor(key)

    monkeypatch.setattr(module, "safe_open", Handle)
    return calls


def expected_visual() -> dict[str, torch.Tensor]:
    return {
        k.removeprefix("transformer.visual."): v
        for k, v in visual_tensors().items()
        if k != "transformer.visual.proj"
    }


def assert_extracted(out: Path, result: ExtractResult) -> None:
    """The folder holds exactly the tower (bf16 kept, no proj) and loads strictly."""
    saved = load_file(out / "model.safetensors")
    expected = expected_visual()
    assert sorted(saved) == sorted(expected) == sorted(QwenViT(TINY_CONFIG).state_dict())
    assert "proj" not in saved
    for key, tensor in expected.items():
        assert saved[key].dtype == torch.bfloat16
        assert torch.equal(saved[key], tensor), key
    assert result.config == TINY_CONFIG
    assert result.num_tensors == len(expected)
    assert result.num_params == sum(t.numel() for t in expected.values())
    assert result.num_bytes == 2 * result.num_params
    assert result.dtypes == ("bfloat16",)
    assert json.loads((out / "preprocessor_config.json").read_text())["crop_size"] == {
        "height": 28,
        "width": 28,
    }

    encoder, transform = load_vision_encoder("qwen_vit", str(out))
    direct = QwenViT(TINY_CONFIG)
    direct.load_state_dict({k: v.float() for k, v in expected.items()}, strict=True)
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        got, want = encoder.eval()(pixels), direct.eval()(pixels)
    assert got.shape == (2, 4, 128)
    assert torch.equal(got, want)


def test_safetensors_shards_read_only_visual_tensors(
    tmp_path: Path, spy_safe_open: dict[str, list[str]]
) -> None:
    src = write_checkpoint(tmp_path / "Qwen-VL-Chat", "safetensors")
    result = extract_qwen(src, tmp_path / "qwen-clip", progress=False)
    assert_extracted(tmp_path / "qwen-clip", result)
    assert result.shards_read == 2
    # The LM-only shard is never opened; no LM tensor and not `proj` is ever fetched.
    assert sorted(spy_safe_open["opened"]) == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
    ]
    wanted = {f"transformer.visual.{k}" for k in expected_visual()}
    assert sorted(spy_safe_open["fetched"]) == sorted(wanted)


def test_bin_shards(tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "src", "bin")
    result = extract_qwen(src, tmp_path / "out", progress=True)
    assert_extracted(tmp_path / "out", result)
    assert result.shards_read == 2


def test_single_safetensors_file(tmp_path: Path, spy_safe_open: dict[str, list[str]]) -> None:
    src = write_checkpoint(tmp_path / "src", "single")
    result = extract_qwen(src, tmp_path / "out", progress=False)
    assert_extracted(tmp_path / "out", result)
    assert not {k for k in spy_safe_open["fetched"] if not k.startswith("transformer.visual.")}
    assert "transformer.visual.proj" not in spy_safe_open["fetched"]


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_single_bin_file(tmp_path: Path, zip_format: bool) -> None:
    src = tmp_path / "src"
    write_checkpoint(src, "single")
    state = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    # The legacy (pre-zip) format cannot be memory-mapped; it is read whole instead.
    torch.save(state, src / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)
    result = extract_qwen(src, tmp_path / "out", progress=False)
    assert_extracted(tmp_path / "out", result)


def test_real_qwen_vl_chat_visual_section_gives_the_default_tower(tmp_path: Path) -> None:
    visual = {  # Qwen/Qwen-VL-Chat config.json, verbatim
        "heads": 16,
        "image_size": 448,
        "image_start_id": 151857,
        "layers": 48,
        "mlp_ratio": 4.9231,
        "output_dim": 4096,
        "patch_size": 14,
        "width": 1664,
    }
    config = {"model_type": "qwen", "visual": visual}
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    derived = read_qwen_vl_config(tmp_path)
    assert derived == QwenViTConfig()
    assert (derived.mlp_size, derived.output_heads, derived.n_queries) == (8192, 32, 256)


def test_out_exists_needs_force_and_force_replaces(tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "src", "safetensors")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old", encoding="utf-8")
    with pytest.raises(CheckpointError, match="not empty; pass --force"):
        extract_qwen(src, out, progress=False)
    assert (out / "stale.txt").is_file()
    extract_qwen(src, out, force=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temp leftovers
    with pytest.raises(CheckpointError, match="would replace the source"):
        extract_qwen(src, src, force=True, progress=False)
    assert (src / "config.json").is_file()


def test_empty_out_folder_is_fine(tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "src", "safetensors")
    (tmp_path / "out").mkdir()
    extract_qwen(src, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"model_type": "llama", "visual": TINY_VISUAL}, "not a Qwen-VL config"),
        ({"model_type": "qwen"}, "not a Qwen-VL config"),
        ({"model_type": "qwen", "visual": {"width": 32}}, "'visual' lacks"),
        ({"model_type": "qwen", "visual": {**TINY_VISUAL, "output_dim": 64}}, "cannot build"),
    ],
)
def test_bad_config(tmp_path: Path, config: dict, match: str) -> None:
    src = write_checkpoint(tmp_path / "src", "safetensors")
    (src / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(CheckpointError, match=match):
        extract_qwen(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_src_and_missing_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist; download it first"):
        extract_qwen(tmp_path / "nope", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        extract_qwen(tmp_path / "empty", tmp_path / "out", progress=False)


def test_no_visual_tensors(tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "src", "safetensors", state=lm_tensors())
    with pytest.raises(CheckpointError, match=r"no transformer\.visual\.\* weights"):
        extract_qwen(src, tmp_path / "out", progress=False)


def test_missing_shard(tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "src", "safetensors")
    (src / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lacks shard.*model-00002-of-00003"):
        extract_qwen(src, tmp_path / "out", progress=False)


def test_missing_visual_key(tmp_path: Path) -> None:
    state = {**visual_tensors(), **lm_tensors()}
    del state["transformer.visual.attn_pool.kv_proj.weight"]
    src = write_checkpoint(tmp_path / "src", "bin", state=state)
    with pytest.raises(CheckpointError, match=r"missing .*attn_pool\.kv_proj\.weight"):
        extract_qwen(src, tmp_path / "out", progress=False)


def test_unexpected_visual_key(tmp_path: Path) -> None:
    state = {**visual_tensors(), **lm_tensors()}
    state["transformer.visual.transformer.resblocks.2.ln_1.weight"] = torch.ones(32)
    src = write_checkpoint(tmp_path / "src", "safetensors", state=state)
    with pytest.raises(CheckpointError, match=r"unexpected .*resblocks\.2\.ln_1\.weight"):
        extract_qwen(src, tmp_path / "out", progress=False)


def test_wrong_shape(tmp_path: Path) -> None:
    state = {**visual_tensors(), **lm_tensors()}
    state["transformer.visual.ln_post.weight"] = torch.ones(64, dtype=torch.bfloat16)
    src = write_checkpoint(tmp_path / "src", "safetensors", state=state)
    with pytest.raises(CheckpointError, match=r"ln_post\.weight \(64,\) != \(128,\)"):
        extract_qwen(src, tmp_path / "out", progress=False)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_unreadable_shard(tmp_path: Path, fmt: str) -> None:
    src = write_checkpoint(tmp_path / "src", fmt)
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    (src / f"{stem}-00002-of-00003.{fmt}").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=f"cannot read shard .*{stem}-00002-of-00003"):
        extract_qwen(src, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_index_points_at_wrong_shard(tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "src", "safetensors")
    index_file = src / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["transformer.visual.ln_post.bias"] = "model-00003-of-00003.safetensors"
    index_file.write_text(json.dumps(index), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"lacks transformer\.visual\.ln_post\.bias"):
        extract_qwen(src, tmp_path / "out", progress=False)
