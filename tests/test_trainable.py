"""What trains is what the config says, for every combination of the `trainable:` section.

vision {frozen, lora, full} x language_model {frozen, lora, full} x embeddings {full, new_tokens,
frozen} x projector {on, off} on the tiny models: requires_grad per parameter against an oracle
written from the documented semantics, and the optimizer groups. For every language_model x
embeddings pair (vision and projector rotating over them), the export holds exactly the trained
tensors and reloads to the in-memory logits after those tensors were perturbed (a frozen projector
is rebuilt bit for bit from train.seed). A tied-head copy of the tiny LM checks that the head
follows the input table.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from unittest import mock

import pytest
import torch
from inference_helpers import randomize_trainable
from rich.console import Console
from safetensors.torch import load_file

from dsvl_cli.config import Config, validate_config
from dsvl_cli.demo.synthetic import generate_synthetic
from dsvl_cli.errors import ConfigError
from dsvl_cli.model import builder
from dsvl_cli.model.builder import build_model, enable_gradient_checkpointing
from dsvl_cli.model.folder import load_model_folder
from dsvl_cli.model.trainable import check_trainable, set_trainable
from dsvl_cli.tools.fuse_lora import probe_inputs, probe_logits
from dsvl_cli.train.export import export_model
from dsvl_cli.train.optim import param_groups, trainable_table
from dsvl_cli.train.param_count import count_parameters

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODES = ("frozen", "lora", "full")
EMBEDDINGS = ("full", "new_tokens", "frozen")
TABLE = "language_model.model.embed_tokens.weight"
HEAD = "language_model.lm_head.weight"
NEW_ROWS = "token_embed.new_rows"
COMBOS = list(itertools.product(MODES, MODES, EMBEDDINGS, (True, False)))
# Each language_model x embeddings pair once; vision runs a Latin square over them, so each
# vision mode meets each LM mode and each embeddings mode; the projector alternates.
EXPORTED = [
    (MODES[(i + j) % 3], lm, emb, (3 * i + j) % 2 == 0)
    for i, lm in enumerate(MODES)
    for j, emb in enumerate(EMBEDDINGS)
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny LM (untied head) and CLIP, plus a copy of the LM whose head is tied to its table."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("trainable")
    generate_synthetic(root, num=8, seed=0)
    lm_config = AutoConfig.from_pretrained(root / "models/lm")
    lm_config.tie_word_embeddings = True
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(lm_config)
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    lm.save_pretrained(root / "models/lm_tied")
    AutoTokenizer.from_pretrained(root / "models/lm").save_pretrained(root / "models/lm_tied")
    return root


def make_config(
    root: Path, combo: tuple[str, str, str, bool], tied: bool = False, **sections: dict
) -> Config:
    vision, lm, embeddings, projector = combo
    tree: dict = {
        "model": {
            "language_model": str(root / ("models/lm_tied" if tied else "models/lm")),
            "vision": {"kind": "clip", "path": str(root / "models/vision")},
            "max_seq_len": 512,
        },
        "trainable": {
            "vision": vision,
            "language_model": lm,
            "embeddings": embeddings,
            "projector": projector,
        },
        "optim": {"weight_decay": 0.1},
    }
    for key, value in sections.items():
        tree.setdefault(key, {}).update(value)
    return validate_config(tree)


def oracle(names: list[str], combo: tuple[str, str, str, bool]) -> set[str]:
    """The documented semantics, spelled out per parameter name of the tiny model."""
    vision, lm, embeddings, projector = combo
    wanted = set()
    for name in names:
        lora = ".lora_" in name
        if name.startswith("vision."):
            trains = vision == "full" or (vision == "lora" and lora)
        elif name.startswith("mm_projector."):
            trains = projector
        elif name == TABLE:
            trains = embeddings == "full"
        elif name == NEW_ROWS:
            trains = embeddings == "new_tokens"
        else:
            assert name.startswith("language_model."), name
            trains = lm == "full" or (lm == "lora" and lora)
        if trains:
            wanted.add(name)
    return wanted


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def check_groups(model: torch.nn.Module, config: Config) -> dict[str, list[str]]:
    """Every trainable parameter in exactly one optimizer group, no frozen one in any."""
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {g["name"]: [names[id(p)] for p in g["params"]] for g in param_groups(model, config)}
    placed = [name for group in by_group.values() for name in group]
    assert len(placed) == len(set(placed))
    assert set(placed) == trainable_names(model)
    return by_group


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(map(str, c)))
def test_every_combination_trains_what_the_config_says(
    models: Path, combo: tuple[str, str, str, bool]
) -> None:
    vision, lm, embeddings, projector = combo
    config = make_config(models, combo)
    model = build_model(config).model
    names = [n for n, _ in model.named_parameters()]
    trained = trainable_names(model)
    assert trained == oracle(names, combo)
    assert (TABLE in trained) == (embeddings == "full")
    assert (NEW_ROWS in names) == (embeddings == "new_tokens")
    assert (HEAD in trained) == (lm == "full")  # untied head: an LM weight
    for part, mode in (("vision", vision), ("language_model", lm)):
        lora = {n for n in names if n.startswith(part + ".") and ".lora_" in n}
        assert bool(lora) == (mode == "lora")
        assert lora <= trained
    assert any(n.startswith("mm_projector.") for n in trained) == projector
    by_group = check_groups(model, config)
    pretrained = set(by_group.get("pretrained_decay", []))
    assert (TABLE in pretrained) == (embeddings == "full")
    assert (NEW_ROWS in pretrained) == (embeddings == "new_tokens")
    check_trainable(model, config)


def table_rows(table: object) -> dict[str, list[str]]:
    """The rendered rich table as {first cell: the other cells}."""
    console = Console(record=True, width=160)
    console.print(table)
    rows = {}
    for line in console.export_text().splitlines():
        cells = [cell.strip() for cell in line.strip("│").split("│")]
        if len(cells) > 1:
            rows[cells[0]] = cells[1:]
    return rows


def _probes(model: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    """An image sample, and text that holds the added token (so new-token rows count)."""
    ids = torch.tensor([[1, 5, model.image_token_id, 9, 17, model.image_token_id, 3]])
    return [probe_inputs(model), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}]


def _logits(model: torch.nn.Module) -> list[torch.Tensor]:
    return [probe_logits(model, inputs) for inputs in _probes(model)]


def export_and_reload(config: Config, out: Path) -> torch.nn.Module:
    """Perturb the trained tensors, export to `out`, reload: the reload gives the same logits.

    Returns the in-memory (perturbed) model.
    """
    built = build_model(config)
    model = built.model
    untrained = _logits(model)
    randomize_trainable(model)
    export_model(model, built, config, out, {"step": 1})
    expected = _logits(model)
    assert any(not torch.equal(a, b) for a, b in zip(untrained, expected, strict=True))
    reloaded = load_model_folder(out).model
    assert not trainable_names(reloaded)  # loaded for inference: frozen
    for got, want in zip(_logits(reloaded), expected, strict=True):
        assert torch.equal(got, want)
    return model


def check_export_files(out: Path, model: torch.nn.Module, config: Config) -> None:
    """model.safetensors holds the trained non-LoRA tensors; adapters/<part> each LoRA part."""
    trained = trainable_names(model)
    assert set(load_file(out / "model.safetensors")) == {n for n in trained if ".lora_" not in n}
    for part in ("vision", "language_model"):
        adapter = out / "adapters" / part / "adapter_model.safetensors"
        lora = {n for n in trained if n.startswith(part + ".") and ".lora_" in n}
        if getattr(config.trainable, part) == "lora":
            assert len(load_file(adapter)) == len(lora) > 0
        else:
            assert not adapter.parent.exists() and not lora


@pytest.mark.parametrize("combo", EXPORTED, ids=lambda c: "-".join(map(str, c)))
def test_export_holds_the_trained_parts_and_reloads(
    models: Path, tmp_path: Path, combo: tuple[str, str, str, bool]
) -> None:
    config = make_config(models, combo)
    model = export_and_reload(config, tmp_path / "export")
    check_export_files(tmp_path / "export", model, config)
    counted = {part.name: part.trainable for part in count_parameters(config).parts}
    real: dict[str, int] = {}
    for name, param in model.named_parameters():
        part = name.split(".", 1)[0]
        real[part] = real.get(part, 0) + (param.numel() if param.requires_grad else 0)
    assert counted == real  # the dry run counts the same trainable set


def test_lora_with_full_embeddings_trains_and_exports_the_table(
    models: Path, tmp_path: Path
) -> None:
    """The reported case (recipes/13b.yaml's LoRA-128 variant): the table was re-frozen by PEFT."""
    combo = ("frozen", "lora", "full", True)
    config = make_config(models, combo)
    model = build_model(config).model
    table = model.language_model.get_input_embeddings().weight
    assert table.requires_grad and not model.language_model.lm_head.weight.requires_grad
    groups = param_groups(model, config)
    pretrained = next(g for g in groups if g["name"] == "pretrained_decay")
    assert [id(p) for p in pretrained["params"]] == [id(table)]
    rows = table_rows(trainable_table(model, groups))
    assert rows["pretrained_decay"][:2] == ["1", f"{table.numel():,}"]
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert rows["language_model"][1] == f"{lora + table.numel():,}"
    export_and_reload(config, tmp_path / "final")
    weights = load_file(tmp_path / "final/model.safetensors")
    assert TABLE in weights and len(weights) == 5  # 4 projector tensors + the table
    check_export_files(tmp_path / "final", model, config)


@pytest.mark.parametrize(
    ("combo", "head_trains"),
    [
        (("frozen", "full", "frozen", False), False),  # the table freezes the tied head with it
        (("frozen", "lora", "full", False), True),  # the table trains the tied head with it
        (("frozen", "full", "new_tokens", False), False),
    ],
)
def test_tied_head_follows_the_input_table(
    models: Path, tmp_path: Path, combo: tuple[str, str, str, bool], head_trains: bool
) -> None:
    config = make_config(models, combo, tied=True)
    model = build_model(config).model
    head = model.language_model.get_output_embeddings().weight
    assert head is model.language_model.get_input_embeddings().weight
    assert head.requires_grad == head_trains
    lm_trained = {n for n in trainable_names(model) if n.startswith("language_model.")}
    assert bool(lm_trained - {TABLE}) == (combo[1] != "frozen")
    check_groups(model, config)
    exported = export_and_reload(config, tmp_path / "export")
    check_export_files(tmp_path / "export", exported, config)


def test_gradient_checkpointing_keeps_the_trainable_set(models: Path) -> None:
    """Built for training (checkpointing on before the set is decided) or enabled afterwards."""
    combo = ("lora", "lora", "full", True)
    config = make_config(models, combo, train={"gradient_checkpointing": True})
    model = build_model(config, training=True).model
    layers = model.language_model.model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert trainable_names(model) == oracle([n for n, _ in model.named_parameters()], combo)
    check_trainable(model, config)
    inputs = probe_inputs(model)
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)
    assert model.language_model.get_input_embeddings().weight.grad.abs().sum() > 0
    later = build_model(config).model
    assert not any(layer.gradient_checkpointing for layer in later.language_model.model.layers)
    enable_gradient_checkpointing(later)  # what the trainer does after building
    assert trainable_names(later) == trainable_names(model)
    check_trainable(later, config)


def test_check_names_what_changed_after_building(models: Path) -> None:
    config = make_config(models, ("frozen", "lora", "full", True))
    model = build_model(config).model
    model.language_model.get_input_embeddings().requires_grad_(False)  # what PEFT used to do
    with pytest.raises(RuntimeError, match=f"frozen but should train .*{TABLE}"):
        check_trainable(model, config)
    set_trainable(model, config)
    check_trainable(model, config)


def test_a_part_with_nothing_to_train_is_a_config_error(models: Path) -> None:
    lora = {"language_model": {"target_modules": ["no_such_layer"]}}
    config = make_config(models, ("frozen", "lora", "frozen", True), lora=lora)
    with pytest.raises(ConfigError, match=r"lora\.language_model\.target_modules .*no_such"):
        build_model(config)
    # A LoRA part without LoRA weights (here: never injected) is refused by the check itself.
    model = build_model(make_config(models, ("frozen", "frozen", "frozen", True))).model
    wants_lora = make_config(models, ("lora", "frozen", "frozen", True))
    with pytest.raises(ConfigError, match=r"trainable\.vision=lora .*lora\.vision\.target_modules"):
        set_trainable(model, wants_lora)


def test_new_tokens_without_added_tokens_warns(models: Path) -> None:
    frozen = make_config(models, ("frozen", "frozen", "frozen", False))
    model = build_model(frozen).model
    vocab = model.get_input_embeddings().num_embeddings
    config = make_config(models, ("frozen", "frozen", "new_tokens", False))
    with mock.patch.object(builder.log, "warning") as warning:
        builder.apply_trainable(model, config, base_vocab=vocab, num_new=0)
    assert "no embedding row trains" in warning.call_args.args[0]
    assert model.token_embed is None and not trainable_names(model)
    check_trainable(model, config)


def test_partial_count_leaves_the_frozen_table_out(models: Path, tmp_path: Path) -> None:
    """The dry run without a vision folder still counts language_model=full + embeddings=frozen."""
    config = make_config(models, ("frozen", "full", "frozen", False))
    missing = config.model.vision.model_copy(update={"path": str(tmp_path / "none")})
    config = config.model_copy(
        update={"model": config.model.model_copy(update={"vision": missing})}
    )
    lm = next(p for p in count_parameters(config).parts if p.name == "language_model")
    model = build_model(make_config(models, ("frozen", "full", "frozen", False))).model
    table = model.language_model.get_input_embeddings().weight.numel()
    assert lm.trainable == lm.total - table
