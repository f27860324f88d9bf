"""Every way a user's vision weights file can be wrong is one line naming the file, what was
found and what was expected (open_clip files; clip and qwen_vit folders)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from inference_helpers import make_export  # noqa: E402

from dsvl_cli.demo.tiny_models import build_tiny_clip
from dsvl_cli.errors import CheckpointError, ConfigError
from dsvl_cli.model.vision_loader import load_vision_encoder

ROOT = Path(__file__).parent.parent
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """An open_clip model-config JSON and a full CLIP state dict of that model."""
    path = tmp_path_factory.mktemp("ocf") / "dsvl-files-tiny.json"
    path.write_text(json.dumps(TINY))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    state = open_clip.create_model(path.stem, pretrained=None).state_dict()
    return path, state


def load(weights: Path, model_json: Path) -> None:
    load_vision_encoder("open_clip", str(weights), open_clip_model=str(model_json))


def one_line(err: pytest.ExceptionInfo[BaseException], *needles: str) -> None:
    message = str(err.value)
    assert "\n" not in message and len(message) < 400, message
    for needle in needles:
        assert needle in message, message


def test_file_contents(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    model_json, state = tiny
    full = tmp_path / "full.bin"
    torch.save(state, full)
    cases: dict[str, tuple[bytes, tuple[str, ...]]] = {
        "empty.bin": (b"", ("empty (0 bytes)", "open_clip checkpoint")),
        "garbage.bin": (bytes(range(256)) * 8, ("not a readable weights file", "2,048 bytes")),
        "cut.bin": (full.read_bytes()[:3000], ("not a readable weights file", "complete")),
    }
    for name, (data, needles) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError) as err:
            load(tmp_path / name, model_json)
        one_line(err, str(tmp_path / name), *needles)
    safe = tmp_path / "full.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, safe)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(safe.read_bytes()[:5000])
    with pytest.raises(CheckpointError) as err:
        load(cut, model_json)
    one_line(err, str(cut), "not a readable weights file")
    load(safe, model_json)  # the complete file loads


def test_state_dict_contents(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    model_json, state = tiny
    tower = tmp_path / "tower.bin"
    torch.save({k: v for k, v in state.items() if k.startswith("visual.")}, tower)
    load(tower, model_json)  # an image-tower-only file is all dsvl needs
    wide = dict(TINY, vision_cfg=dict(TINY["vision_cfg"], width=96))
    wide_json = tmp_path / "dsvl-files-wide.json"
    wide_json.write_text(json.dumps(wide))
    with pytest.raises(CheckpointError) as err:
        load(tower, wide_json)
    one_line(err, "image tower width 96", "shapes differ", "(64,) where (96,) was expected")
    listing = tmp_path / "list.bin"
    torch.save([1, 2], listing)
    with pytest.raises(CheckpointError) as err:
        load(listing, model_json)
    one_line(err, "holds list, not a dict of tensors")
    text_only = tmp_path / "text.bin"
    torch.save({k: v for k, v in state.items() if not k.startswith("visual.")}, text_only)
    with pytest.raises(CheckpointError) as err:
        load(text_only, model_json)
    one_line(err, "no visual.* tensor")


def test_hf_clip_weights_and_folders(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    model_json, _ = tiny
    clip = tmp_path / "clip"
    build_tiny_clip(clip)
    with pytest.raises(CheckpointError) as err:
        load(clip / "model.safetensors", model_json)
    one_line(err, "Hugging Face CLIP weights", "model.vision.kind=clip")
    with pytest.raises(CheckpointError) as err:
        load(clip, model_json)
    one_line(err, "is a folder", "open_clip checkpoint")
    with pytest.raises(CheckpointError) as err:
        load(tmp_path / "nothing.bin", model_json)
    one_line(err, "not found")
    with pytest.raises(ConfigError) as err:
        load_vision_encoder("open_clip", str(clip / "model.safetensors"), open_clip_model="ViT-X")
    one_line(err, "unknown open_clip model 'ViT-X'")


def test_clip_folder_with_bad_weights(tmp_path: Path) -> None:
    clip = tmp_path / "clip"
    build_tiny_clip(clip)
    with pytest.raises(CheckpointError) as err:
        load_vision_encoder("clip", str(clip / "model.safetensors"))
    one_line(err, "is a file", "kind=open_clip")
    weights = clip / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4000])
    with pytest.raises(CheckpointError) as err:
        load_vision_encoder("clip", str(clip))
    one_line(err, "does not load as a CLIP vision tower")


def test_chat_with_an_empty_weights_file(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    """`dsvl chat` used to print only 'Aborted.' (exit 1) for an empty open_clip file."""
    model_json, state = tiny
    weights = tmp_path / "open_clip.bin"
    torch.save(state, weights)
    vision = {"kind": "open_clip", "path": str(weights), "open_clip_model": str(model_json)}
    export = make_export(tmp_path / "run", vision=vision) / "export"
    (tmp_path / "empty.bin").write_bytes(b"")
    command = [sys.executable, "-m", "dsvl_cli", "chat", str(export), "--prompt", "hi"]
    command += ["--base-vision", str(tmp_path / "empty.bin")]
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert "empty (0 bytes)" in out.stderr and "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "empty.bin is empty" in errors[0], out.stderr


def test_qwen_vit_folder_with_bad_weights(tmp_path: Path) -> None:
    from dsvl_cli.model.qwen_vit import QwenViT, QwenViTConfig
    from dsvl_cli.model.vision_loader import save_qwen_vit_folder

    config = QwenViTConfig(
        image_size=28,
        patch_size=14,
        width=32,
        layers=1,
        heads=4,
        mlp_size=64,
        n_queries=4,
        output_dim=48,
        output_heads=4,
    )
    folder = tmp_path / "qwen"
    save_qwen_vit_folder(folder, config, QwenViT(config).state_dict())
    load_vision_encoder("qwen_vit", str(folder))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    with pytest.raises(CheckpointError) as err:
        load_vision_encoder("qwen_vit", str(folder))
    one_line(err, str(weights), "not a readable weights file", "extract-qwen")
