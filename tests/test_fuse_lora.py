"""dsvl fuse-lora: exports -> standalone folders (LoRA merged), and original DSVL checkpoints.

Tolerance used throughout: fp32 tiny models, max abs logit difference <= 1e-5 between the fused
folder (reloaded from disk) and the unmerged export. Merging W + s*B@A once in fp32 moves logits
by ~1e-7 here; a missed or mis-scaled adapter moves them by ~1e-2 (LoRA B set to N(0, 0.05)).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import yaml
from inference_helpers import randomize_trainable
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from dsvl_cli import dist
from dsvl_cli.config import Config, validate_config
from dsvl_cli.demo.synthetic import generate_synthetic
from dsvl_cli.errors import CheckpointError
from dsvl_cli.model.builder import Built, build_model
from dsvl_cli.model.folder import load_model_folder
from dsvl_cli.tools.fuse_lora import FuseResult, fuse_lora, probe_inputs, probe_logits
from dsvl_cli.train.export import export_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOL = 1e-5
LORA_EVERYWHERE = {"language_model": "lora", "vision": "lora", "embeddings": "new_tokens"}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    generate_synthetic(out, num=8, seed=0)
    return out


def make_config(shapes: Path, trainable: dict, **model: object) -> Config:
    vision = model.pop("vision", {"kind": "clip", "path": str(shapes / "models/vision")})
    tree = {
        "model": {
            "language_model": str(shapes / "models/lm"),
            "vision": vision,
            "max_seq_len": 256,
            **model,
        },
        "trainable": trainable,
        "lora": {"language_model": {"r": 4, "alpha": 8}, "vision": {"r": 2, "alpha": 4}},
        "distributed": {"precision": "fp32"},
    }
    return validate_config(tree)


def make_export(config: Config, out: Path, seed: int = 0) -> Built:
    torch.manual_seed(seed)
    built = build_model(config)
    randomize_trainable(built.model, seed)
    export_model(built.model, built, config, out, {"step": 1})
    return built


def reloaded_logits(folder: Path, inputs: dict) -> torch.Tensor:
    return probe_logits(load_model_folder(folder).model, inputs)


@pytest.fixture(scope="module")
def lora_export(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "final"
    make_export(make_config(shapes, LORA_EVERYWHERE), out)
    return out


@pytest.fixture(scope="module")
def fused(lora_export: Path) -> FuseResult:
    return fuse_lora(lora_export, lora_export.parent / "fused", tolerance=TOL)


def test_fused_logits_equal_unmerged_export(lora_export: Path, fused: FuseResult) -> None:
    source = load_model_folder(lora_export)
    assert sum("lora_" in n for n, _ in source.model.named_parameters()) > 0
    inputs = probe_inputs(source.model, seed=5)  # not the probe fuse_lora used
    expected = probe_logits(source.model, inputs)
    got = reloaded_logits(fused.out, inputs)
    assert (got - expected).abs().max() <= TOL
    assert fused.merged_parts == ("language_model", "vision")
    assert fused.max_abs_diff <= TOL and fused.reload_diff <= TOL and fused.dtype == "float32"
    # The adapters really matter: with LoRA disabled the logits move far beyond the tolerance.
    for module in source.model.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(False)
    assert (probe_logits(source.model, inputs) - expected).abs().max() > 100 * TOL


def test_fused_folder_is_standalone(lora_export: Path, fused: FuseResult) -> None:
    from transformers import AutoModelForCausalLM

    out = fused.out
    assert not any("adapter" in f or "lora" in f for f in fused.files)
    assert {"config.yaml", "meta.json", "model.safetensors"} <= set(fused.files)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "dsvl-fused" and meta["source"]["format"] == "dsvl-export"
    assert meta["merged_lora"] == ["language_model", "vision"]
    config = (out / "config.yaml").read_text()
    assert "language_model: language_model\n" in config and "path: vision\n" in config
    assert set(load_file(out / "model.safetensors")) == {
        "mm_projector.projection.0.weight",
        "mm_projector.projection.0.bias",
        "mm_projector.projection.1.weight",
        "mm_projector.projection.1.bias",
    }
    # Plain transformers loads the merged LM; the trained <image> row is in its table.
    lm = AutoModelForCausalLM.from_pretrained(out / "language_model")
    weights = load_file(lora_export / "model.safetensors")
    new_rows = weights["token_embed.new_rows"]
    table = lm.get_input_embeddings().weight
    torch.testing.assert_close(table[-new_rows.shape[0] :], new_rows, rtol=0, atol=0)
    assert not any("lora" in n for n, _ in lm.named_parameters())
    fused_lm = load_model_folder(out).model.language_model
    assert lm.state_dict().keys() == fused_lm.state_dict().keys()
    for name, value in lm.state_dict().items():
        torch.testing.assert_close(value, fused_lm.state_dict()[name], rtol=0, atol=0)
    assert torch.isfinite(lm(torch.tensor([[1, 5, 9, 13]])).logits).all()


def test_refuses_double_fuse_and_occupied_out(lora_export: Path, fused: FuseResult) -> None:
    with pytest.raises(CheckpointError, match="already fused; use it directly"):
        fuse_lora(fused.out, fused.out.parent / "twice")
    with pytest.raises(CheckpointError, match="not empty; pass --force"):
        fuse_lora(lora_export, fused.out)
    with pytest.raises(CheckpointError, match="overlaps"):
        fuse_lora(lora_export, lora_export / "inside")
    stamp = (fused.out / "meta.json").stat().st_mtime_ns
    again = fuse_lora(lora_export, fused.out, force=True)
    assert again.files == fused.files and (fused.out / "meta.json").stat().st_mtime_ns != stamp
    assert not (fused.out.parent / f".{fused.out.name}.tmp").exists()


def test_tolerance_violation_writes_nothing(lora_export: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="differ by"):
        fuse_lora(lora_export, tmp_path / "strict", tolerance=-1.0)
    assert not (tmp_path / "strict").exists() and not (tmp_path / ".strict.tmp").exists()


def test_export_without_lora_fuses(shapes: Path, tmp_path: Path) -> None:
    trainable = {"embeddings": "full"}
    make_export(make_config(shapes, trainable), tmp_path / "export", seed=1)
    result = fuse_lora(tmp_path / "export", tmp_path / "fused", tolerance=TOL)
    assert result.merged_parts == () and result.max_abs_diff == 0.0
    inputs = probe_inputs(load_model_folder(tmp_path / "export").model, seed=2)
    expected = reloaded_logits(tmp_path / "export", inputs)
    assert (reloaded_logits(tmp_path / "fused", inputs) - expected).abs().max() <= TOL
    trained = load_file(tmp_path / "export" / "model.safetensors")
    lm = load_model_folder(tmp_path / "fused").model.language_model
    torch.testing.assert_close(
        lm.get_input_embeddings().weight,
        trained["language_model.model.embed_tokens.weight"],
        rtol=0,
        atol=0,
    )


def test_tied_embeddings_keep_their_output_rows(shapes: Path, tmp_path: Path) -> None:
    """Folding trained input rows must not change a tied LM head (it trained untouched)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    base = AutoModelForCausalLM.from_pretrained(shapes / "models/lm")
    base.config.tie_word_embeddings = True
    tied = LlamaForCausalLM(base.config)
    tied.load_state_dict(base.state_dict())
    tied.save_pretrained(tmp_path / "lm")
    AutoTokenizer.from_pretrained(shapes / "models/lm").save_pretrained(tmp_path / "lm")
    config = make_config(shapes, LORA_EVERYWHERE, language_model=str(tmp_path / "lm"))
    lm = make_export(config, tmp_path / "export").model.language_model
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    result = fuse_lora(tmp_path / "export", tmp_path / "fused", tolerance=TOL)
    inputs = probe_inputs(load_model_folder(tmp_path / "export").model, seed=3)
    expected = reloaded_logits(tmp_path / "export", inputs)
    assert (reloaded_logits(result.out, inputs) - expected).abs().max() <= TOL
    saved = json.loads((result.out / "language_model" / "config.json").read_text())
    assert saved["tie_word_embeddings"] is False


# ----------------------------------------------------------------------------- DeepSpeed exports


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def deepspeed_export(config: Config, out: Path, stage: int) -> None:
    """Build (ZeRO-3: partitioned while loading), wrap in a real engine, export from it."""
    import deepspeed
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "train_batch_size": 1,
        "zero_optimization": {"stage": stage},
    }
    torch.manual_seed(0)
    try:
        built = build_model(config, ds_config=ds_config)
        # ZeRO-3: the LM's layers are partitioned while from_pretrained loads them
        partitioned = hasattr(
            built.model.language_model.model.layers[0].mlp.up_proj.weight, "ds_id"
        )
        assert partitioned == (stage == 3)
        randomize_trainable(built.model)
        trainable = [p for p in built.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-3)  # a torch optimizer: no FusedAdam JIT
        engine, *_ = deepspeed.initialize(model=built.model, optimizer=optimizer, config=ds_config)
        export_model(engine.module, built, config, out, {"zero_stage": stage})
    finally:
        unset_hf_deepspeed_config()


@pytest.fixture(scope="module")
def zero_exports(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("zero")
    env = {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }
    config = make_config(shapes, LORA_EVERYWHERE)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        dist.init()  # as dsvl train does: no shared-memory op build
        # The process group stays up (as in test_engine.py): DeepSpeed caches its groups, so
        # destroying it would break later deepspeed.initialize calls in this pytest process.
        for stage in (2, 3):
            deepspeed_export(config, root / f"zero{stage}", stage)
    return {stage: root / f"zero{stage}" for stage in (2, 3)}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {
        f"{path.relative_to(folder)}:{key}": value
        for path in sorted(folder.rglob("*.safetensors"))
        for key, value in load_file(path).items()
    }


def test_zero3_export_fuses_like_zero2(zero_exports: dict[int, Path], tmp_path: Path) -> None:
    exported = [_tensors(zero_exports[stage]) for stage in (2, 3)]
    assert exported[0].keys() == exported[1].keys() and len(exported[0]) > 10
    fused = [fuse_lora(zero_exports[s], tmp_path / f"fused{s}", tolerance=TOL) for s in (2, 3)]
    assert fused[0].files == fused[1].files
    weights = [_tensors(result.out) for result in fused]
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=0, atol=0, msg=key)


# ----------------------------------------------------------------------------- other encoders

TINY_QWEN = {
    "image_size": 28,
    "patch_size": 14,
    "width": 32,
    "layers": 2,
    "heads": 4,
    "mlp_size": 64,
    "n_queries": 4,
    "output_dim": 48,
    "output_heads": 4,
    "pos_grid": 2,
}
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 4, "layers": 1},
}


def vision_section(kind: str, root: Path) -> dict:
    """Write a tiny random encoder of `kind` under `root`; its `model.vision` config section."""
    torch.manual_seed(3)
    if kind == "qwen_vit":
        from dsvl_cli.model.qwen_vit import QwenViT, QwenViTConfig
        from dsvl_cli.model.vision_loader import save_qwen_vit_folder

        config = QwenViTConfig(**TINY_QWEN)
        save_qwen_vit_folder(root / "qwen", config, QwenViT(config).state_dict())
        return {"kind": kind, "path": str(root / "qwen")}
    import open_clip

    model_json = root / "dsvl-fuse-tiny-vit.json"
    model_json.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(model_json)
    weights = root / "open_clip_pytorch_model.bin"
    torch.save(open_clip.create_model(model_json.stem, pretrained=None).state_dict(), weights)
    return {"kind": kind, "path": str(weights), "open_clip_model": str(model_json)}


@pytest.mark.parametrize("kind", ["qwen_vit", "open_clip"])
def test_vision_lora_fuses_for_every_encoder_kind(shapes: Path, tmp_path: Path, kind: str) -> None:
    vision = vision_section(kind, tmp_path)
    trainable = {"vision": "lora", "embeddings": "frozen"}
    config = make_config(shapes, trainable, vision=vision)
    make_export(config, tmp_path / "export", seed=2)
    result = fuse_lora(tmp_path / "export", tmp_path / "fused", tolerance=TOL)
    assert result.merged_parts == ("vision",)
    inputs = probe_inputs(load_model_folder(tmp_path / "export").model, seed=7)
    expected = reloaded_logits(tmp_path / "export", inputs)
    assert (reloaded_logits(tmp_path / "fused", inputs) - expected).abs().max() <= TOL
    written = (
        "vision/model.safetensors" if kind == "qwen_vit" else "vision/open_clip_model.safetensors"
    )
    assert written in result.files
    if kind == "open_clip":  # the model-config JSON travels with the fused folder
        assert "vision/dsvl-fuse-tiny-vit.json" in result.files
        fused_vision = yaml.safe_load((result.out / "config.yaml").read_text())["model"]["vision"]
        assert fused_vision["open_clip_model"] == "vision/dsvl-fuse-tiny-vit.json"


# ----------------------------------------------------------------------------- original DSVL

ORIGINAL_TOKENS = ["### Image:", "<image>", "<PAD>"]  # the original's additions, in its order


def write_original_checkpoint(shapes: Path, folder: Path) -> dict[str, torch.Tensor]:
    """An epoch folder in the original layout, from the tiny base models plus random changes."""
    from transformers import AutoTokenizer, CLIPVisionModel, LlamaForCausalLM

    folder.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(shapes / "models/lm")
    tokenizer.add_tokens(ORIGINAL_TOKENS, special_tokens=True)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(4)
    lm = LlamaForCausalLM.from_pretrained(shapes / "models/lm")
    lm.resize_token_embeddings(len(tokenizer))
    vision = CLIPVisionModel.from_pretrained(shapes / "models/vision")
    state = {f"lang_decoder.{k}": v for k, v in lm.state_dict().items()}
    # transformers 4.x (the original's) nested CLIPVisionModel weights under `vision_model.`
    state |= {
        f"vis_encoder.vision_model.{k}": v + 0.01 * torch.randn_like(v)
        for k, v in vision.state_dict().items()
    }
    state["vis_encoder.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    hidden = lm.config.hidden_size
    state |= {
        "lang_embed.weight": torch.randn(len(tokenizer), hidden),
        "projection.0.weight": torch.randn(hidden, 64),
        "projection.0.bias": torch.randn(hidden),
        "projection.1.weight": torch.rand(hidden) + 0.5,
        "projection.1.bias": torch.randn(hidden),
        # fused already: the LoRA factors are leftovers to drop
        "lang_decoder.model.layers.0.self_attn.q_proj.lora_right_weight": torch.randn(hidden, 4),
        "lang_decoder.model.layers.0.self_attn.q_proj.lora_left_weight": torch.randn(4, hidden),
        "lang_decoder.model.layers.0.self_attn.rotary_emb.inv_freq": torch.randn(8),
    }
    torch.save(state, folder / "pytorch_model.bin")
    args = {"vis_proj": "baseline", "enable_mmca_attention": True, "max_seq_len": 512}
    torch.save(args, folder / "train_args.pt")
    return state


def test_original_dsvl_checkpoint_converts(shapes: Path, tmp_path: Path) -> None:
    from dsvl_cli.tools.dsvl_legacy import convert_dsvl_checkpoint

    state = write_original_checkpoint(shapes, tmp_path / "epoch-0")
    lm_path, vision_path = str(shapes / "models/lm"), str(shapes / "models/vision")
    result = convert_dsvl_checkpoint(
        tmp_path / "epoch-0", tmp_path / "out", lm_path, "clip", vision_path
    )
    meta = json.loads((result.out / "meta.json").read_text())
    assert meta["format"] == "dsvl-fused" and meta["image_order"] == "reversed"
    config = yaml.safe_load((result.out / "config.yaml").read_text())["model"]
    assert (config["projector"], config["mmca"]["enabled"], config["max_seq_len"]) == (
        "linear",
        True,
        512,
    )
    built = load_model_folder(result.out)
    base = len(built.tokenizer) - 1  # dsvl adds only <image>
    assert meta["dropped_tokens"] == {"### Image:": base, "<PAD>": base + 2}
    image_id = built.tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == built.model.image_token_id == base
    model = built.model
    rows = torch.cat([torch.arange(base), torch.tensor([base + 1])])  # <image> was base + 1
    exact = {"rtol": 0, "atol": 0}
    table = model.get_input_embeddings().weight
    torch.testing.assert_close(table, state["lang_embed.weight"][rows], **exact)
    head = model.get_output_embeddings().weight
    torch.testing.assert_close(head, state["lang_decoder.lm_head.weight"][rows], **exact)
    proj = model.mm_projector.projection
    torch.testing.assert_close(proj[0].weight, state["projection.0.weight"], **exact)
    torch.testing.assert_close(proj[1].bias, state["projection.1.bias"], **exact)
    key = "encoder.layers.1.mlp.fc2.weight"
    original = state[f"vis_encoder.vision_model.{key}"]
    torch.testing.assert_close(model.vision.model.get_parameter(key), original, **exact)
    logits = probe_logits(model, probe_inputs(model, seed=1))
    assert torch.isfinite(logits).all() and logits.shape[-1] == base + 1
    with pytest.raises(CheckpointError, match="already fused"):
        fuse_lora(result.out, tmp_path / "again")
    with pytest.raises(CheckpointError, match="--from-dsvl"):
        fuse_lora(tmp_path / "epoch-0", tmp_path / "again")


def test_original_checkpoint_mismatches_are_named(shapes: Path, tmp_path: Path) -> None:
    from dsvl_cli.tools.dsvl_legacy import convert_dsvl_checkpoint

    write_original_checkpoint(shapes, tmp_path / "epoch-0")
    args = (str(shapes / "models/lm"), "clip", str(shapes / "models/vision"))
    with pytest.raises(
        CheckpointError, match=r"missing 20 .*unexpected 4 \(e.g. mm_projector.0.bias"
    ):
        convert_dsvl_checkpoint(tmp_path / "epoch-0", tmp_path / "out", *args, projector="vit")
    with pytest.raises(CheckpointError, match="not 'mlp'"):
        convert_dsvl_checkpoint(tmp_path / "epoch-0", tmp_path / "out", *args, projector="mlp")
    (tmp_path / "epoch-0" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        convert_dsvl_checkpoint(tmp_path / "epoch-0", tmp_path / "out", *args)
    assert not (tmp_path / "out").exists()
