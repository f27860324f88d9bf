"""AdamW parameter groups on the tiny model, the optimizer, the LR schedule, the step count."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

from dsvl_cli.config import Config, validate_config
from dsvl_cli.errors import ConfigError, DataError
from dsvl_cli.model.builder import build_model
from dsvl_cli.train.optim import (
    build_optimizer,
    build_scheduler,
    is_norm,
    param_groups,
    total_steps,
    trainable_table,
    warmup_steps,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LR, LR_PRETRAINED, WD = 1e-3, 2e-5, 0.05


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dsvl_cli.demo.synthetic import generate_synthetic

    out = tmp_path_factory.mktemp("shapes")
    generate_synthetic(out, num=8, seed=0)
    return out


def make_config(shapes: Path, **sections: dict) -> Config:
    tree: dict = {
        "model": {
            "language_model": str(shapes / "models/lm"),
            "vision": {"kind": "clip", "path": str(shapes / "models/vision")},
            "max_seq_len": 512,
        },
        "optim": {"lr": LR, "lr_pretrained": LR_PRETRAINED, "weight_decay": WD},
    }
    for key, value in sections.items():
        tree.setdefault(key, {}).update(value)
    return validate_config(tree)


def groups_for(shapes: Path, **sections: dict) -> tuple[nn.Module, dict[str, list[str]], list]:
    """The model, group name -> parameter names, and the groups themselves."""
    config = make_config(shapes, **sections)
    model = build_model(config).model
    groups = param_groups(model, config)
    names = {id(p): n for n, p in model.named_parameters()}
    return model, {g["name"]: [names[id(p)] for p in g["params"]] for g in groups}, groups


def _check_partition(model: nn.Module, by_group: dict[str, list[str]]) -> None:
    """Every trainable parameter in exactly one group; frozen ones in none."""
    placed = [name for names in by_group.values() for name in names]
    assert len(placed) == len(set(placed))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(placed) == trainable


def _norm_and_bias_names(model: nn.Module) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if param.requires_grad and (is_norm(module) or pname == "bias"):
                names.add(f"{module_name}.{pname}")
    return names


def test_default_policy_groups(shapes: Path) -> None:
    model, by_group, groups = groups_for(shapes)
    _check_partition(model, by_group)
    assert by_group["pretrained_decay"] == ["language_model.model.embed_tokens.weight"]
    assert sorted(by_group["decay"]) == ["mm_projector.projection.0.weight"]
    # Linear bias and the projector LayerNorm (named projection.1.*: the original decayed it)
    assert sorted(by_group["no_decay"]) == [
        "mm_projector.projection.0.bias",
        "mm_projector.projection.1.bias",
        "mm_projector.projection.1.weight",
    ]
    settings = {g["name"]: (g["lr"], g["weight_decay"]) for g in groups}
    assert settings == {
        "decay": (LR, WD),
        "no_decay": (LR, 0.0),
        "pretrained_decay": (LR_PRETRAINED, WD),
    }


def test_lm_full_puts_rms_norms_in_no_decay(shapes: Path) -> None:
    model, by_group, _ = groups_for(shapes, trainable={"language_model": "full"})
    _check_partition(model, by_group)
    norms = [n for n in by_group["no_decay"] if n.startswith("language_model")]
    # 2 layers x 2 LlamaRMSNorm + the final norm; LLaMA has no biases
    assert len(norms) == 5 and all("norm" in n for n in norms)
    assert set(by_group["no_decay"]) == _norm_and_bias_names(model)
    assert by_group["pretrained_decay"] == ["language_model.model.embed_tokens.weight"]
    assert "language_model.lm_head.weight" in by_group["decay"]
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in by_group["decay"]


def test_lora_groups(shapes: Path) -> None:
    trainable = {"language_model": "lora", "vision": "lora", "embeddings": "frozen"}
    model, by_group, _ = groups_for(shapes, trainable=trainable)
    _check_partition(model, by_group)
    lora = [n for n in by_group["decay"] if "lora_" in n]
    assert lora and all(".lora_A." in n or ".lora_B." in n for n in lora)
    assert any(n.startswith("language_model") for n in lora)
    assert any(n.startswith("vision") for n in lora)
    assert not any("pretrained" in g for g in by_group)
    assert not any("lora_" in n for n in by_group["no_decay"])


def test_new_tokens_rows_use_pretrained_lr(shapes: Path) -> None:
    model, by_group, groups = groups_for(shapes, trainable={"embeddings": "new_tokens"})
    _check_partition(model, by_group)
    assert by_group["pretrained_decay"] == ["token_embed.new_rows"]
    group = next(g for g in groups if g["name"] == "pretrained_decay")
    assert group["lr"] == LR_PRETRAINED
    assert not model.language_model.get_input_embeddings().weight.requires_grad


def test_vision_full_1d_params_and_position_table(shapes: Path) -> None:
    model, by_group, _ = groups_for(shapes, trainable={"vision": "full", "embeddings": "frozen"})
    _check_partition(model, by_group)
    assert "vision.model.embeddings.class_embedding" in by_group["no_decay"]
    assert by_group["pretrained_decay"] == ["vision.model.embeddings.position_embedding.weight"]
    assert "vision.model.embeddings.patch_embedding.weight" in by_group["decay"]


def test_lr_pretrained_defaults_to_lr(shapes: Path) -> None:
    config = make_config(shapes, optim={"lr_pretrained": None})
    groups = param_groups(build_model(config).model, config)
    assert {g["lr"] for g in groups} == {LR}


def test_tied_parameter_counted_once() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    config = validate_config({"model": {"language_model": "x", "vision": {"path": "y"}}})
    groups = param_groups(model, config)
    assert [(g["name"], len(g["params"])) for g in groups] == [("pretrained_decay", 1)]


def test_build_optimizer_and_table(shapes: Path) -> None:
    config = make_config(shapes, optim={"betas": [0.8, 0.9], "eps": 1e-7})
    model = build_model(config).model
    optimizer = build_optimizer(model, config)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.8, 0.9) and optimizer.defaults["eps"] == 1e-7
    assert [g["name"] for g in optimizer.param_groups] == ["decay", "no_decay", "pretrained_decay"]
    console = Console(record=True, width=140)
    console.print(trainable_table(model, optimizer.param_groups))
    text = console.export_text()
    for word in ("pretrained_decay", "vision", "mm_projector", "language_model", "% trained"):
        assert word in text
    embed = model.language_model.get_input_embeddings().weight.numel()
    assert f"{embed:,}" in text


def test_cpu_training_uses_the_fused_adamw_kernel_with_the_same_updates() -> None:
    tree = {"model": {"language_model": "x", "vision": {"path": "y"}}, "optim": {"lr": 0.1}}
    config = validate_config(tree)
    steps = []
    for device in (None, torch.device("cpu")):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        optimizer = build_optimizer(model, config, device)
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(2, 4)).square().sum().backward()
            optimizer.step()
        steps.append(
            (optimizer.defaults["fused"], torch.cat([p.flatten() for p in model.parameters()]))
        )
    (plain_fused, plain), (cpu_fused, fused) = steps
    assert not plain_fused and cpu_fused is True
    torch.testing.assert_close(fused, plain)  # the same AdamW, another kernel


def test_offload_uses_deepspeed_cpu_adam(monkeypatch: pytest.MonkeyPatch) -> None:
    import deepspeed.ops.adam

    class FakeCPUAdam(torch.optim.AdamW):  # the real one JIT-builds an op (see test_engine)
        def __init__(self, params: list, adamw_mode: bool, **kwargs: object) -> None:
            assert adamw_mode is True
            super().__init__(params, **kwargs)

    monkeypatch.setattr(deepspeed.ops.adam, "DeepSpeedCPUAdam", FakeCPUAdam)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    tree = {"model": {"language_model": "x", "vision": {"path": "y"}}, "optim": {"eps": 1e-7}}
    offload = {"zero_stage": 2, "offload_optimizer": True}
    optimizer = build_optimizer(model, validate_config({**tree, "distributed": offload}))
    assert type(optimizer) is FakeCPUAdam and optimizer.defaults["eps"] == 1e-7
    assert [g["name"] for g in optimizer.param_groups] == ["decay", "no_decay"]
    plain = build_optimizer(model, validate_config(tree))
    assert type(plain) is torch.optim.AdamW


def test_build_optimizer_refuses_nothing_trainable(shapes: Path) -> None:
    config = make_config(shapes, trainable={"projector": False, "embeddings": "frozen"})
    with pytest.raises(ConfigError, match="no parameter is trainable"):
        build_optimizer(build_model(config).model, config)


# ----------------------------------------------------------------------------- schedule


def _lrs(config: Config, total: int, steps: list[int]) -> dict[int, list[float]]:
    """Group lrs after `step` scheduler steps, for each step in `steps`."""
    params = [nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))]
    groups = [{"params": [params[0]], "lr": 1.0}, {"params": [params[1]], "lr": 0.1}]
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    scheduler = build_scheduler(optimizer, config, total)
    seen = {}
    for step in range(max(steps) + 1):
        if step in steps:
            seen[step] = [g["lr"] for g in optimizer.param_groups]
        optimizer.step()
        scheduler.step()
    return seen


def _cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.mark.parametrize("optim", [{"warmup_steps": 10}, {"warmup_ratio": 0.1}])
def test_cosine_warmup_by_steps_or_ratio(optim: dict) -> None:
    config = validate_config(
        {"model": {"language_model": "x", "vision": {"path": "y"}}, "optim": optim}
    )
    assert warmup_steps(config, 100) == 10
    seen = _lrs(config, 100, [0, 5, 10, 55, 100])
    for step, (lr, lr_small) in seen.items():
        assert lr == pytest.approx(_cosine(step, 10, 100), abs=1e-12)
        assert lr_small == pytest.approx(0.1 * _cosine(step, 10, 100), abs=1e-12)
    assert seen[5][0] == pytest.approx(0.5) and seen[55][0] == pytest.approx(0.5)


def test_linear_schedule_and_no_warmup() -> None:
    config = validate_config(
        {"model": {"language_model": "x", "vision": {"path": "y"}}, "optim": {"schedule": "linear"}}
    )
    assert warmup_steps(config, 100) == 0
    seen = _lrs(config, 20, [0, 5, 20])
    assert [seen[s][0] for s in (0, 5, 20)] == pytest.approx([1.0, 0.75, 0.0])


def test_warmup_ratio_rounds() -> None:
    config = validate_config(
        {"model": {"language_model": "x", "vision": {"path": "y"}}, "optim": {"warmup_ratio": 0.03}}
    )
    assert warmup_steps(config, 250) == 8
    assert warmup_steps(config, 10) == 0


def test_total_steps() -> None:
    assert total_steps(10, 4, 3, None) == 9  # 3 epochs x ceil(10 / 4)
    assert total_steps(10, 4, 3, 5) == 5
    assert total_steps(10, 4, 3, 100) == 9
    assert total_steps(8, 4, 2, None) == 4
    assert total_steps(1, 8, 1, None) == 1
    with pytest.raises(DataError, match="no batch"):
        total_steps(0, 1, 1, None)
