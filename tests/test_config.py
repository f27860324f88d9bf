"""Config loading, overrides, error messages, and every shipped recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsvl_cli.config import (
    Config,
    apply_override,
    dump_config,
    load_config,
    parse_yaml,
    validate_config,
)
from dsvl_cli.errors import ConfigError

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
MINIMAL = "model:\n  language_model: lm\n  vision:\n    path: vis\n"


@pytest.fixture()
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL)
    return path


def test_every_recipe_validates() -> None:
    assert {p.name for p in RECIPES} >= {"tiny.yaml", "7b.yaml", "13b.yaml", "70b.yaml"}
    for path in RECIPES:
        config = load_config(path)
        assert isinstance(config, Config)
        assert path.read_text().startswith("#"), f"{path.name} must begin with its run command"
        assert "dsvl train recipes/" in path.read_text()


def test_7b_matches_the_original_run_script() -> None:
    config = load_config(RECIPES[[p.name for p in RECIPES].index("7b.yaml")])
    assert config.model.vision.kind == "clip" and config.model.projector == "linear"
    assert config.model.mmca.enabled and config.model.max_images_per_sample == 8
    assert config.optim.lr == pytest.approx(1e-3) and config.optim.warmup_ratio == pytest.approx(
        0.1
    )
    assert config.optim.schedule == "cosine" and config.train.epochs == 6
    assert config.distributed.zero_stage == 3 and config.train.global_batch_size == 128
    assert config.train.gradient_checkpointing
    concat = [spec.concat for spec in config.data.sources.values()]
    assert concat == [3, 2, 1, 1, 1, 1, 1, 1, 1]


def test_large_recipes_use_qwen_vit() -> None:
    for name in ("13b.yaml", "70b.yaml"):
        config = load_config(Path(RECIPES[0]).parent / name)
        assert config.model.vision.kind == "qwen_vit"
        assert config.distributed.zero_stage == 3


def test_scientific_notation_is_a_float(recipe: Path) -> None:
    config = load_config(recipe, ["optim.lr=1e-4", "optim.eps=2E-8"])
    assert config.optim.lr == pytest.approx(1e-4) and isinstance(config.optim.lr, float)
    assert parse_yaml("x: 1e-4", "t") == {"x": 1e-4}
    recipe.write_text(MINIMAL + "optim:\n  lr: 3e-5\n")
    assert load_config(recipe).optim.lr == pytest.approx(3e-5)


def test_overrides_are_yaml_and_nested(recipe: Path) -> None:
    config = load_config(
        recipe,
        [
            "train.epochs=3",
            "model.mmca=false",
            "optim.betas=[0.9, 0.999]",
            "data.sources.llava.concat=3",
            "distributed.deepspeed={steps_per_print: 5}",
        ],
    )
    assert config.train.epochs == 3
    assert config.model.mmca.enabled is False
    assert config.optim.betas == (0.9, 0.999)
    assert config.data.sources["llava"].concat == 3
    assert config.data.sources["llava"].samples == "all"
    assert config.distributed.deepspeed == {"steps_per_print": 5}


def test_all_problems_in_one_error(recipe: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(recipe, ["optim.lr=abc", "trian.epochs=2"])
    message = str(info.value)
    assert "optim.lr" in message and "'abc'" in message
    assert "trian: unknown key; did you mean 'train'?" in message
    assert "\n" not in message


def test_unknown_nested_key_suggests(recipe: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.epoch: unknown key; did you mean 'epochs'"):
        load_config(recipe, ["train.epoch=2"])


def test_missing_required_and_bad_literal() -> None:
    with pytest.raises(ConfigError) as info:
        validate_config({"model": {"vision": {"path": "v", "kind": "siglip"}}})
    message = str(info.value)
    assert "model.language_model: required" in message
    assert "model.vision.kind" in message and "siglip" in message


def test_warmup_is_steps_or_ratio(recipe: Path) -> None:
    with pytest.raises(ConfigError, match="warmup_steps or warmup_ratio"):
        load_config(recipe, ["optim.warmup_steps=10", "optim.warmup_ratio=0.1"])
    assert load_config(recipe, ["optim.warmup_steps=10"]).optim.warmup_steps == 10


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_override({}, "optim.lr")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_override({"optim": {"lr": 1.0}}, "optim.lr.x=2")


def test_missing_recipe_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_dump_round_trips(recipe: Path, tmp_path: Path) -> None:
    config = load_config(recipe, ["optim.lr=2e-4", "data.sources.llava.samples=100"])
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(config))
    assert load_config(again) == config


def test_section_type_errors_say_mapping_not_class(recipe: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(recipe, ["model.mmca=maybe"])
    message = str(info.value)
    assert (
        "model.mmca: expected true/false or a mapping with enabled, image_attends_text" in message
    )
    assert "MMCAConfig" not in message
    with pytest.raises(ConfigError) as info:
        load_config(recipe, ["model.vision=3"])
    assert "model.vision: expected a mapping with kind, path" in str(info.value)
    assert "VisionConfig" not in str(info.value)
    assert load_config(recipe, ["model.mmca=false"]).model.mmca.enabled is False


def test_overwrite_does_not_combine_with_a_checkpoint(recipe: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(recipe, ["train.overwrite=true", "train.resume=out/checkpoints/step-3"])
    message = str(info.value)
    assert "train: overwrite=true trains from step 0" in message and "{" not in message
    assert load_config(recipe, ["train.overwrite=true"]).train.overwrite is True
