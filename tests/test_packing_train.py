"""Training with `data.packing` / `data.group_by_length` on real DeepSpeed (CPU): exact resume."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsvl_cli.config import load_config
from dsvl_cli.demo.synthetic import generate_synthetic
from dsvl_cli.train.trainer import fit

ROOT = Path(__file__).parent.parent
RECIPE = ROOT / "recipes" / "tiny.yaml"
RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module", autouse=True)
def _rendezvous_env() -> Iterator[None]:
    """In-process training sets RANK, MASTER_PORT, ...; later subprocess tests must not inherit."""
    saved = {key: os.environ.get(key) for key in RENDEZVOUS}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    generate_synthetic(out, num=60, seed=0)
    return out


def overrides(shapes: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.language_model={shapes}/models/lm",
        f"model.vision.path={shapes}/models/vision",
        f"data.prepared_dir={shapes}",
        f"train.output_dir={out}",
        "model.max_seq_len=256",
        "train.micro_batch_size=1",
        "train.global_batch_size=2",
        "train.epochs=1",  # six steps in one epoch: the resume is inside it
        "train.max_steps=6",
        "train.save_every=3",
        "train.keep_last=5",
        "optim.schedule=constant",
        "optim.warmup_ratio=null",
        "data.packing=true",
        *extra,
    ]


def test_packed_resume_inside_an_epoch_continues_the_exact_losses(
    shapes: Path, tmp_path: Path
) -> None:
    whole = tmp_path / "whole"
    expected = fit(load_config(RECIPE, overrides(shapes, whole))).losses
    assert len(expected) == 6 and all(loss == loss for loss in expected)
    state = json.loads((whole / "checkpoints/step-3/trainer_state.json").read_text())
    assert state["epoch"] == 0 and state["batches_in_epoch"] == 6  # inside epoch 0
    resumed = tmp_path / "resumed"
    got = fit(
        load_config(
            RECIPE,
            overrides(shapes, resumed, f"train.resume={whole}/checkpoints/step-3"),
        )
    ).losses
    assert got == expected[3:]  # the same floats: same rows, same order, same weights


def test_group_by_length_trains_and_resumes_exactly(shapes: Path, tmp_path: Path) -> None:
    grouped = ("data.packing=false", "data.group_by_length=true", "train.micro_batch_size=2")
    whole = tmp_path / "whole"
    expected = fit(load_config(RECIPE, overrides(shapes, whole, *grouped))).losses
    assert len(expected) == 6
    resumed = tmp_path / "resumed"
    resume = f"train.resume={whole}/checkpoints/step-3"
    got = fit(load_config(RECIPE, overrides(shapes, resumed, *grouped, resume))).losses
    assert got == expected[3:]


def test_packed_rows_load_in_worker_processes(shapes: Path, tmp_path: Path) -> None:
    # rows of samples travel through a DataLoader worker (pickled dataset, collator, batches)
    config = load_config(RECIPE, overrides(shapes, tmp_path, "data.workers=1", "train.max_steps=2"))
    result = fit(config)
    assert result.steps == 2 and all(loss == loss for loss in result.losses)
