"""The DeepSpeed config dict: batch arithmetic, ZeRO/precision/offload sections, the extra merge,
and one real `deepspeed.initialize` + step on CPU with the dict, optimizer and scheduler."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from dsvl_cli.config import Config, validate_config
from dsvl_cli.errors import ConfigError
from dsvl_cli.train.engine import deep_merge, deepspeed_config, gradient_accumulation_steps

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def make_config(**sections: dict) -> Config:
    tree: dict = {"model": {"language_model": "lm", "vision": {"kind": "clip", "path": "v"}}}
    for key, value in sections.items():
        tree.setdefault(key, {}).update(value)
    return validate_config(tree)


def ds_for(world: int = 1, **sections: dict) -> dict:
    return deepspeed_config(make_config(**sections), world)


# ----------------------------------------------------------------------------- batch sizes


def test_batch_identity() -> None:
    config = make_config(train={"micro_batch_size": 2, "global_batch_size": 128})
    assert gradient_accumulation_steps(config, 8) == 8
    ds = deepspeed_config(config, 8)
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["train_batch_size"] == 128
    assert ds["gradient_accumulation_steps"] == 8
    assert ds["train_batch_size"] == 2 * 8 * ds["gradient_accumulation_steps"]


def test_batch_error_suggests_valid_sizes() -> None:
    config = make_config(train={"micro_batch_size": 4, "global_batch_size": 100})
    with pytest.raises(ConfigError) as err:
        gradient_accumulation_steps(config, 8)
    assert str(err.value).startswith(
        "train.global_batch_size=100 is not a multiple of micro_batch_size 4 x 8 GPUs = 32; "
        "use 96 or 128"
    )
    small = make_config(train={"micro_batch_size": 4, "global_batch_size": 16})
    with pytest.raises(ConfigError, match=r"= 32; use 32 \("):
        deepspeed_config(small, 8)


# ----------------------------------------------------------------------------- sections


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_stage_and_precision_sections(stage: int, precision: str) -> None:
    ds = ds_for(distributed={"zero_stage": stage, "precision": precision})
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert "offload_optimizer" not in zero and "offload_param" not in zero
    if stage == 3:
        assert zero["stage3_param_persistence_threshold"] == 10_000
        assert zero["stage3_max_live_parameters"] == 30_000_000
        assert zero["stage3_prefetch_bucket_size"] > 0
    else:
        assert not any(key.startswith("stage3_") for key in zero)
    assert ("bf16" in ds, "fp16" in ds) == (precision == "bf16", precision == "fp16")
    if precision == "bf16":
        assert ds["bf16"] == {"enabled": True}
    if precision == "fp16":
        assert ds["fp16"] == {
            "enabled": True,
            "loss_scale": 0,
            "loss_scale_window": 100,
            "initial_scale_power": 16,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    assert ds["gradient_clipping"] == 1.0
    assert ds["zero_allow_untested_optimizer"] is True
    assert ds["wall_clock_breakdown"] is False
    assert ds["steps_per_print"] >= 10**6
    assert "optimizer" not in ds and "scheduler" not in ds


def test_dicts_pass_deepspeeds_own_validation() -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    combos = [
        {"zero_stage": s, "precision": p} for s in (0, 1, 2, 3) for p in ("fp32", "bf16", "fp16")
    ]
    combos += [
        {"zero_stage": 2, "offload_optimizer": True},
        {"zero_stage": 3, "offload_optimizer": True, "offload_params": True},
    ]
    for dist in combos:
        parsed = DeepSpeedConfig(ds_for(distributed=dist))  # world size 1 without a process group
        assert parsed.zero_optimization_stage == dist["zero_stage"]
        precision = dist.get("precision", "bf16")
        assert parsed.bfloat16_config.enabled == (precision == "bf16")
        assert parsed.float16_config.enabled == (precision == "fp16")
        if precision == "fp16":
            assert parsed.float16_config.loss_scale_window == 100
        assert parsed.gradient_clipping == 1.0


def test_offload_sections_and_their_stage_checks() -> None:
    zero = ds_for(distributed={"zero_stage": 2, "offload_optimizer": True})["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert "offload_param" not in zero
    dist = {"zero_stage": 3, "offload_optimizer": True, "offload_params": True}
    zero = ds_for(distributed=dist)["zero_optimization"]
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    with pytest.raises(ConfigError, match="offload_params needs distributed.zero_stage=3 .got 2"):
        ds_for(distributed={"zero_stage": 2, "offload_params": True})
    with pytest.raises(ConfigError, match="offload_optimizer needs .* 1, 2 or 3 .got 0"):
        ds_for(distributed={"zero_stage": 0, "offload_optimizer": True})


def test_grad_clip_none_means_no_clipping() -> None:
    assert ds_for(train={"grad_clip": None})["gradient_clipping"] == 0.0
    assert ds_for(train={"grad_clip": 0.5})["gradient_clipping"] == 0.5


# ----------------------------------------------------------------------------- extra dict


def test_extra_dict_is_deep_merged_last() -> None:
    extra = {
        "zero_optimization": {"reduce_bucket_size": 1000, "stage3_max_live_parameters": 5},
        "bf16": {"immediate_grad_update": True},
        "gradient_clipping": 2.0,
        "tensorboard": {"enabled": True, "output_path": "tb"},
    }
    ds = ds_for(distributed={"zero_stage": 3, "precision": "bf16", "deepspeed": extra})
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3  # kept
    assert zero["stage3_param_persistence_threshold"] == 10_000  # kept
    assert zero["reduce_bucket_size"] == 1000  # added
    assert zero["stage3_max_live_parameters"] == 5  # overridden
    assert ds["bf16"] == {"enabled": True, "immediate_grad_update": True}
    assert ds["gradient_clipping"] == 2.0
    assert ds["tensorboard"] == {"enabled": True, "output_path": "tb"}


def test_deep_merge_does_not_mutate_inputs() -> None:
    base = {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
    extra = {"a": {"c": {"f": 4}}, "e": {"g": 5}}
    merged = deep_merge(base, extra)
    assert merged == {"a": {"b": 1, "c": {"d": 2, "f": 4}}, "e": {"g": 5}}
    assert base == {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
    merged["e"]["g"] = 0
    assert extra["e"]["g"] == 5


@pytest.mark.parametrize(
    ("key", "field"),
    [
        ("train_batch_size", "train.global_batch_size"),
        ("gradient_accumulation_steps", "train.global_batch_size"),
        ("optimizer", "optim"),
    ],
)
def test_extra_dict_may_not_set_derived_keys(key: str, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"{key} \(set {field}"):
        ds_for(distributed={"deepspeed": {key: 4}})


# ----------------------------------------------------------------------------- real engine


def _single_rank_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rendezvous variables of a one-process job, on a free local port, and its process
    group made as `dsvl train` makes it (without DeepSpeed's shared-memory op build)."""
    from dsvl_cli import dist

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for key, value in {**env, "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(key, value)
    dist.init()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dsvl_cli.demo.synthetic import generate_synthetic

    out = tmp_path_factory.mktemp("shapes")
    generate_synthetic(out, num=8, seed=0)
    return out


def _one_sample_batch(built, shapes: Path) -> dict[str, torch.Tensor]:
    from PIL import Image

    from dsvl_cli.data.conversation import Conversation, Message
    from dsvl_cli.data.template import encode_conversation

    conv = Conversation(
        [Message("user", "<image>\nWhat colour is the square?"), Message("assistant", "red")],
        images=["images/000000.png"],
    )
    model = built.model
    enc = encode_conversation(
        conv, built.tokenizer, model.image_token_id, model.tokens_per_image, 512
    )
    ids = torch.tensor([enc.input_ids])
    return {
        "input_ids": ids,
        "labels": torch.tensor([enc.labels]),
        "attention_mask": torch.ones_like(ids),
        "pixel_values": built.image_transform(Image.open(shapes / conv.images[0]))[None],
    }


def test_deepspeed_initialize_and_step_on_cpu(
    shapes: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import deepspeed

    from dsvl_cli.model.builder import build_model
    from dsvl_cli.train.optim import build_optimizer, build_scheduler

    _single_rank_env(monkeypatch)
    config = validate_config(
        {
            "model": {
                "language_model": str(shapes / "models/lm"),
                "vision": {"kind": "clip", "path": str(shapes / "models/vision")},
                "max_seq_len": 512,
            },
            "optim": {"lr": 1e-2, "lr_pretrained": 1e-3, "weight_decay": 0.1, "warmup_steps": 1},
            "distributed": {"zero_stage": 2, "precision": "fp32"},
        }
    )
    torch.manual_seed(0)
    built = build_model(config)
    optimizer = build_optimizer(built.model, config)
    scheduler = build_scheduler(optimizer, config, total_steps=4)
    engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
        model=built.model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(config, world_size=1),
    )
    batch = _one_sample_batch(built, shapes)
    before = built.model.mm_projector.projection[0].weight.detach().clone()
    losses = []
    for _ in range(2):
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert engine.global_steps == 2
    assert not torch.equal(before, built.model.mm_projector.projection[0].weight.detach())
    # warmup 1 step then cosine over 4: after 2 steps the factor is (1 + cos(pi / 3)) / 2 = 0.75
    lrs = {group["name"]: group["lr"] for group in ds_optimizer.param_groups}
    assert lrs["decay"] == pytest.approx(1e-2 * 0.75)
    assert lrs["pretrained_decay"] == pytest.approx(1e-3 * 0.75)
    assert ds_scheduler is scheduler


@pytest.mark.slow  # the first run on a machine JIT-builds DeepSpeed's cpu_adam op (~2 minutes)
def test_offloaded_optimizer_steps_on_cpu(shapes: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import deepspeed
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from dsvl_cli.model.builder import build_model
    from dsvl_cli.train.optim import build_optimizer

    _single_rank_env(monkeypatch)
    config = validate_config(
        {
            "model": {
                "language_model": str(shapes / "models/lm"),
                "vision": {"kind": "clip", "path": str(shapes / "models/vision")},
                "max_seq_len": 512,
            },
            "distributed": {"zero_stage": 2, "precision": "fp32", "offload_optimizer": True},
        }
    )
    torch.manual_seed(0)
    built = build_model(config)
    optimizer = build_optimizer(built.model, config)
    assert isinstance(optimizer, DeepSpeedCPUAdam)
    engine, *_ = deepspeed.initialize(
        model=built.model, optimizer=optimizer, config=deepspeed_config(config, world_size=1)
    )
    loss = engine(**_one_sample_batch(built, shapes)).loss
    engine.backward(loss)
    engine.step()
    assert torch.isfinite(loss) and engine.global_steps == 1


def test_an_epoch_smaller_than_the_global_batch_suggests_global_sizes() -> None:
    from dsvl_cli.train.engine import check_epoch_fits_a_step

    # 180 samples -> 44 micro-batches of 4 per epoch; a step of 256 needs 64 of them.
    config = make_config(train={"micro_batch_size": 4, "global_batch_size": 256})
    with pytest.raises(ConfigError) as err:
        check_epoch_fits_a_step(config, 1, 44)
    assert str(err.value) == (
        "train.global_batch_size=256 needs 64 micro-batches of 4 per process (1 process) for "
        "one step, but an epoch of the training split gives 44 per process; use a multiple of 4 "
        "up to 176, e.g. 128 or 64 (or add training samples)"
    )
    check_epoch_fits_a_step(config, 1, 64)  # exactly one step per epoch is fine
    check_epoch_fits_a_step(config, 1, 0)  # no batch at all: optim.total_steps says so
