"""LM features dsvl cannot run are refused in one line when the config is checked; the attention
without MMCA is the LM's best supported; LoRA targets resolve per architecture and are reported."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from lm_matrix_helpers import build, family_config, family_folder  # noqa: E402

from dsvl_cli.demo.synthetic import generate_synthetic  # noqa: E402
from dsvl_cli.errors import ConfigError  # noqa: E402
from dsvl_cli.model.lm_support import check_language_model  # noqa: E402
from dsvl_cli.model.trainable import adapted_modules  # noqa: E402
from dsvl_cli.train.param_count import count_parameters  # noqa: E402

ROOT = Path(__file__).parent.parent
WINDOW = {"sliding_window": 32}
QWEN2_WINDOW = {"sliding_window": 32, "use_sliding_window": True, "max_window_layers": 0}
GEMMA2_NO_SOFTCAP = {"attn_logit_softcapping": None, "final_logit_softcapping": None}
GEMMA2_DEFAULT = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("support")
    generate_synthetic(out, num=4, seed=0)
    return out


# (family, folder name, config overrides, the LM field the refusal names)
REFUSED = [
    ("mistral", "mistral-w32", WINDOW, "sliding_window=32"),
    ("qwen2", "qwen2-w32", QWEN2_WINDOW, "sliding_window=32"),
    ("gemma2", "gemma2-softcap", GEMMA2_DEFAULT, "attn_logit_softcapping=50.0"),
]


@pytest.mark.parametrize(("family", "name", "overrides", "field"), REFUSED)
def test_mmca_refuses_unsupported_lm_features(
    shapes: Path, family: str, name: str, overrides: dict, field: str
) -> None:
    lm = family_folder(shapes, family, name, **overrides)
    config = family_config(shapes, lm)
    with pytest.raises(ConfigError) as err:
        check_language_model(config.model)
    message = str(err.value)
    assert field in message and "model.mmca=false" in message and "\n" not in message
    with pytest.raises(ConfigError, match=field.split("=")[0]):  # eval, chat, serve build so
        build(config)
    # The way out works: MMCA off (the LM's own attention), or a window the sequences fit.
    check_language_model(family_config(shapes, lm, model={"mmca": False}).model)
    if "sliding_window" in field:
        assert "model.max_seq_len<=32" in message
        check_language_model(family_config(shapes, lm, model={"max_seq_len": 32}).model)


def test_chat_length_window_is_refused_at_load(shapes: Path) -> None:
    """A window shorter than the context chat allows (max_seq_len) is refused before chatting."""
    lm = family_folder(shapes, "mistral", "mistral-w143", sliding_window=143)
    with pytest.raises(ConfigError, match="sliding_window=143 < model.max_seq_len=256"):
        build(family_config(shapes, lm))


@pytest.mark.parametrize("overrides", [GEMMA2_NO_SOFTCAP, GEMMA2_DEFAULT], ids=["nocap", "caps"])
def test_gemma2_without_mmca_uses_its_own_attention(shapes: Path, overrides: dict) -> None:
    """With MMCA off Gemma2 builds and counts with the attention transformers picks for it (no
    SDPA in transformers 5.24), eager when it softcaps attention logits (5.17's SDPA would drop
    the cap)."""
    name = "gemma2-nocap" if overrides is GEMMA2_NO_SOFTCAP else "gemma2-softcap"
    lm = family_folder(shapes, "gemma2", name, **overrides)
    config = family_config(shapes, lm, model={"mmca": False})
    counted = count_parameters(config)
    assert all(part.total is not None for part in counted.parts)
    built = build(config)
    expected = AutoModelForCausalLM.from_pretrained(lm).config._attn_implementation
    if overrides is GEMMA2_DEFAULT:
        expected = "eager"
    assert built.model.language_model.config._attn_implementation == expected


def test_user_attention_without_mmca(shapes: Path) -> None:
    lm = family_folder(shapes, "llama")
    built = build(family_config(shapes, lm, model={"mmca": False, "attn_implementation": "eager"}))
    assert built.model.language_model.config._attn_implementation == "eager"
    gemma2 = family_folder(shapes, "gemma2", "gemma2-nocap", **GEMMA2_NO_SOFTCAP)
    kernel = "flash_attention_2"  # not installed with dsvl (and no GPU in tests)
    bad = family_config(shapes, gemma2, model={"mmca": False, "attn_implementation": kernel})
    with pytest.raises(ConfigError, match=f"model.attn_implementation={kernel} does not fit"):
        build(bad)


def test_attention_setting_needs_mmca_off(shapes: Path) -> None:
    with pytest.raises(ConfigError, match="attn_implementation applies with model.mmca=false"):
        family_config(shapes, family_folder(shapes, "llama"), model={"attn_implementation": "sdpa"})


def test_phi3_lora_default_adapts_fused_layers(shapes: Path) -> None:
    lm = family_folder(shapes, "phi3")
    built = build(family_config(shapes, lm, trainable={"language_model": "lora"}))
    adapted = adapted_modules(built.model.language_model)
    assert adapted == {"qkv_proj": 2, "o_proj": 2, "gate_up_proj": 2, "down_proj": 2}
    # The trainable table printed at the start of training says so.
    from rich.console import Console

    from dsvl_cli.train.optim import param_groups, trainable_table

    console = Console(width=200, record=True)
    config = family_config(shapes, lm, trainable={"language_model": "lora"})
    console.print(trainable_table(built.model, param_groups(built.model, config)))
    text = console.export_text()
    assert "LoRA in language_model" in text
    assert "down_proj x2, gate_up_proj x2, o_proj x2, qkv_proj x2" in text


def test_partial_lora_targets_are_reported(shapes: Path, caplog: pytest.LogCaptureFixture) -> None:
    lm = family_folder(shapes, "phi3")
    old_default = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = family_config(
        shapes,
        lm,
        trainable={"language_model": "lora"},
        lora={"language_model": {"target_modules": old_default}},
    )
    with caplog.at_level(logging.WARNING):
        build(config)
    assert "but not gate_up_proj, qkv_proj" in caplog.text
    none = family_config(
        shapes,
        lm,
        trainable={"language_model": "lora"},
        lora={"language_model": {"target_modules": ["q_proj"]}},
    )
    with pytest.raises(ConfigError, match="lora.language_model.target_modules"):
        build(none)


def dry_run(shapes: Path, lm: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    recipe = shapes / "recipe.yaml"
    tree = {"model": {"language_model": str(lm), "vision": {"path": str(shapes / "models/vision")}}}
    recipe.write_text(yaml.safe_dump(tree))
    command = [sys.executable, "-m", "dsvl_cli", "train", str(recipe), "--dry-run", *overrides]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True)


def test_dry_run_refuses_and_accepts(shapes: Path) -> None:
    mistral = family_folder(shapes, "mistral", "mistral-w32", **WINDOW)
    refused = dry_run(shapes, mistral)
    assert refused.returncode == 2, refused.stderr
    assert "sliding_window=32" in refused.stderr and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    gemma2 = family_folder(shapes, "gemma2", "gemma2-softcap", **GEMMA2_DEFAULT)
    softcap = dry_run(shapes, gemma2)
    assert softcap.returncode == 2 and "attn_logit_softcapping=50.0" in softcap.stderr
    assert len(softcap.stderr.strip().splitlines()) == 1, softcap.stderr
    accepted = dry_run(shapes, gemma2, "model.mmca=false")
    assert accepted.returncode == 0, accepted.stderr
    assert "unknown" not in accepted.stdout.split("language_model", 1)[-1].split("\n", 1)[0]
