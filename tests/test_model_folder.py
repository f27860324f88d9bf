"""Model folders travel: exports and fused folders load from any working directory, copied
elsewhere, with base models moved (--base-lm / --base-vision); their LoRA adapters load with plain
PEFT onto plain transformers models.

Equalities are exact (atol 0) where the same fp32 modules run the same ops (plain PEFT vs dsvl's
injected LoRA, a copied folder vs the original); fused vs unfused uses test_fuse_lora's 1e-5.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from inference_helpers import randomize_trainable
from rich.console import Console
from safetensors.torch import load_file, save_file

from dsvl_cli.config import Config, validate_config
from dsvl_cli.demo.synthetic import generate_synthetic
from dsvl_cli.errors import CheckpointError, ConfigError
from dsvl_cli.inference.chat import run_chat
from dsvl_cli.inference.generation import GenerationSettings
from dsvl_cli.inference.loader import load_for_inference
from dsvl_cli.inference.session import ChatSession
from dsvl_cli.model.builder import build_model
from dsvl_cli.model.folder import PEFT_PREFIX, drop_adapter_name, load_model_folder
from dsvl_cli.tools.fuse_lora import fuse_lora, probe_inputs, probe_logits
from dsvl_cli.train.export import export_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LORA_BOTH = {"language_model": "lora", "vision": "lora", "embeddings": "frozen"}
SETTINGS = GenerationSettings(max_new_tokens=4)
TEXT_IDS = torch.tensor([[1, 5, 9, 13, 20, 7, 42, 3]])


def lora_config(lm: str | Path, vision: str | Path) -> Config:
    return validate_config(
        {
            "model": {
                "language_model": str(lm),
                "vision": {"kind": "clip", "path": str(vision)},
                "max_seq_len": 256,
            },
            "trainable": LORA_BOTH,
            "lora": {"language_model": {"r": 4, "alpha": 8}, "vision": {"r": 2, "alpha": 4}},
        }
    )


def write_lora_export(config: Config, out: Path) -> None:
    """An export with non-zero LoRA on the LM and the vision tower (and a trained projector)."""
    torch.manual_seed(0)
    built = build_model(config)
    randomize_trainable(built.model)
    export_model(built.model, built, config, out, {"step": 1})


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny base models under a folder name with a space; an export written from inside it
    with the recipe's base paths relative (as `dsvl train` run there writes them)."""
    root = tmp_path_factory.mktemp("shapes") / "base models"
    generate_synthetic(root, num=8, seed=0)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        write_lora_export(lora_config("models/lm", "models/vision"), root / "export")
    return root


def pixels(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def answer(folder: Path, **bases: Path) -> str:
    loaded = load_for_inference(folder, device="cpu", dtype="fp32", **bases)
    return ChatSession.from_loaded(loaded, SETTINGS).ask("What colour?", []).text


# ----------------------------------------------------------------------------- absolute paths


def test_export_stores_absolute_base_paths(shapes: Path) -> None:
    export = shapes / "export"
    model = yaml.safe_load((export / "config.yaml").read_text())["model"]
    assert model["language_model"] == str(shapes / "models/lm")
    assert model["vision"]["path"] == str(shapes / "models/vision")
    meta = json.loads((export / "meta.json").read_text())
    assert meta["base_models"] == {
        "language_model": str(shapes / "models/lm"),
        "vision": str(shapes / "models/vision"),
    }
    lm = json.loads((export / "adapters/language_model/adapter_config.json").read_text())
    vision = json.loads((export / "adapters/vision/adapter_config.json").read_text())
    assert lm["task_type"] == "CAUSAL_LM"
    assert lm["base_model_name_or_path"] == str(shapes / "models/lm")
    assert vision["base_model_name_or_path"] == str(shapes / "models/vision")


def test_copied_export_chats_from_any_cwd(
    shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = answer(shapes / "export")
    copy = tmp_path / "copied export" / "final"
    shutil.copytree(shapes / "export", copy)
    monkeypatch.chdir("/")
    assert answer(copy) == expected
    out = Console(file=io.StringIO(), width=200, color_system=None)
    assert run_chat(copy, [], "What colour?", SETTINGS, device="cpu", out=out) == 0
    assert out.file.getvalue() == f"{expected}\n"  # type: ignore[attr-defined]


@pytest.fixture()
def moved(shapes: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(an export whose base models were moved after export, where they are now)."""
    old_home = tmp_path / "old home"
    shutil.copytree(shapes / "models", old_home / "models")
    write_lora_export(
        lora_config(old_home / "models/lm", old_home / "models/vision"), tmp_path / "export"
    )
    new_home = tmp_path / "new home"
    old_home.rename(new_home)
    return tmp_path / "export", new_home / "models"


def test_moved_base_models_need_the_override(
    moved: tuple[Path, Path], shapes: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    export, models = moved
    monkeypatch.chdir("/")
    lm_field = f"{export}/config.yaml: model.language_model '{export.parent}/old home/models/lm'"
    with pytest.raises(CheckpointError, match="pass --base-lm NEW_PATH") as err:
        load_for_inference(export, device="cpu")
    assert str(err.value).startswith(f"{lm_field} does not exist;")
    with pytest.raises(CheckpointError, match=r"model\.vision\.path .* pass --base-vision"):
        load_for_inference(export, device="cpu", base_lm=models / "lm")
    # Moved models, same weights: the answer of the export whose models never moved.
    bases = {"base_lm": models / "lm", "base_vision": models / "vision"}
    assert answer(export, **bases) == answer(shapes / "export")
    with pytest.raises(CheckpointError, match="pass --base-vision"):
        fuse_lora(export, export.parent / "fused", base_lm=models / "lm")
    fused = fuse_lora(export, export.parent / "fused", tolerance=1e-5, **bases)
    assert fused.merged_parts == ("language_model", "vision")


def test_fused_folder_travels(
    shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fused = fuse_lora(shapes / "export", tmp_path / "fused", tolerance=1e-5).out
    source = load_model_folder(shapes / "export").model
    inputs = probe_inputs(source, seed=3)
    expected = probe_logits(source, inputs)
    copy = tmp_path / "elsewhere" / "my fused model"
    shutil.copytree(fused, copy)
    shutil.rmtree(fused)
    monkeypatch.chdir("/")
    assert (probe_logits(load_model_folder(copy).model, inputs) - expected).abs().max() <= 1e-5
    with pytest.raises(ConfigError, match="apply to exports only"):
        load_for_inference(copy, device="cpu", base_lm=shapes / "models/lm")


def test_cli_chat_from_root_with_moved_base_models(moved: tuple[Path, Path], shapes: Path) -> None:
    export, models = moved
    cmd = [sys.executable, "-m", "dsvl_cli", "chat", str(export), "--prompt", "What colour?"]
    cmd += ["--device", "cpu", "--max-new-tokens", str(SETTINGS.max_new_tokens)]
    missing = subprocess.run(cmd, cwd="/", capture_output=True, text=True)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "config.yaml: model.language_model" in missing.stderr
    assert "--base-lm" in missing.stderr
    overrides = ["--base-lm", str(models / "lm"), "--base-vision", str(models / "vision")]
    ok = subprocess.run(cmd + overrides, cwd="/", capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == f"{answer(shapes / 'export')}\n"


# ----------------------------------------------------------------------------- plain PEFT


def test_language_model_adapter_loads_with_plain_peft(shapes: Path) -> None:
    from peft import AutoPeftModelForCausalLM

    adapter = shapes / "export/adapters/language_model"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = AutoPeftModelForCausalLM.from_pretrained(adapter)
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    check = plain.load_adapter(adapter, adapter_name="check")
    assert not [k for k in check.missing_keys if "lora_" in k] and not check.unexpected_keys
    plain.set_adapter("default")
    plain.eval()
    dsvl = load_model_folder(shapes / "export").model
    with torch.no_grad():
        # Text only: MMCA reduces to causal attention; dsvl's table has one more row (<image>).
        ours = dsvl(input_ids=TEXT_IDS, attention_mask=torch.ones_like(TEXT_IDS)).logits
        theirs = plain(input_ids=TEXT_IDS).logits
        plain.disable_adapter_layers()
        without_lora = plain(input_ids=TEXT_IDS).logits
    vocab = theirs.shape[-1]
    assert ours.shape[-1] == vocab + 1
    torch.testing.assert_close(theirs, ours[..., :vocab], rtol=0, atol=0)
    assert (without_lora - theirs).abs().max() > 1e-3  # the adapter really changes the LM


def test_vision_adapter_loads_onto_plain_clip(shapes: Path) -> None:
    from peft import PeftModel
    from transformers import CLIPVisionModel

    adapter = shapes / "export/adapters/vision"
    base = CLIPVisionModel.from_pretrained(shapes / "models/vision")
    plain = PeftModel.from_pretrained(base, adapter).eval()
    check = plain.load_adapter(adapter, adapter_name="check")
    assert not [k for k in check.missing_keys if "lora_" in k] and not check.unexpected_keys
    plain.set_adapter("default")
    encoder = load_model_folder(shapes / "export").model.vision
    px = pixels(encoder.image_size)
    with torch.no_grad():
        ours = encoder(px)
        theirs = plain(pixel_values=px).last_hidden_state
        plain.disable_adapter_layers()
        without_lora = plain(pixel_values=px).last_hidden_state
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
    assert (without_lora - theirs).abs().max() > 1e-3


def test_earlier_export_layout_still_loads(shapes: Path, tmp_path: Path) -> None:
    """Vision adapter keys under dsvl's wrapper (`model.`), as exports used to write them."""
    old = tmp_path / "old export"
    shutil.copytree(shapes / "export", old)
    (old / "manifest.json").unlink()  # earlier exports had none
    file = old / "adapters/vision/adapter_model.safetensors"
    tensors = load_file(file)
    wrapped = {k.replace(PEFT_PREFIX, PEFT_PREFIX + "model.", 1): v for k, v in tensors.items()}
    save_file(wrapped, file)
    reference = load_model_folder(shapes / "export").model.vision
    px = pixels(reference.image_size)
    with torch.no_grad():
        expected = reference(px)
        torch.testing.assert_close(load_model_folder(old).model.vision(px), expected)
    save_file({k.replace("lora_A", "lora_Q"): v for k, v in tensors.items()}, file)
    with pytest.raises(CheckpointError, match="match no LoRA layer of the vision"):
        load_model_folder(old)


def test_adapter_name_is_dropped_only_after_a_lora_module() -> None:
    name = "model.vision_model.encoder.layers.0.self_attn.q_proj.lora_A.vision.weight"
    assert drop_adapter_name(name, "vision") == name.replace(".lora_A.vision.", ".lora_A.")
    assert drop_adapter_name("x.lora_embedding_B.vision", "vision") == "x.lora_embedding_B"
    assert drop_adapter_name("a.vision.b.lora_B.vision_x.weight", "vision") == (
        "a.vision.b.lora_B.vision_x.weight"
    )
