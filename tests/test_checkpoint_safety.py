"""Resumable checkpoints are safe to load: weights-only reads, refused when crafted or incomplete,
and ZeRO 0-3 still resume bit-exactly through the weights-only path."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import dsvl_cli.train.safe_load as safe_load_module
from dsvl_cli.config import load_config
from dsvl_cli.demo.synthetic import generate_synthetic
from dsvl_cli.errors import CheckpointError
from dsvl_cli.model.manifest import MANIFEST_FILE, write_manifest
from dsvl_cli.train.checkpoint import find_resume
from dsvl_cli.train.safe_load import DEEPSPEED_GLOBALS, allowed_globals, safe_load
from dsvl_cli.train.trainer import fit

ROOT = Path(__file__).parent.parent
RECIPE = ROOT / "recipes" / "tiny.yaml"
COMMON = ("optim.schedule=constant", "optim.warmup_ratio=null", "train.keep_last=10")
_RUNS: dict[int, tuple[Path, list[float]]] = {}
RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class PlantMarker:
    """Unpickled by plain pickle, it creates `path` (stands in for arbitrary code)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


@pytest.fixture(scope="module", autouse=True)
def _rendezvous_env() -> Iterator[None]:
    """In-process training sets RANK, MASTER_PORT, ... in os.environ; later tests that start
    `dsvl train` subprocesses must not inherit a port this process's process group holds."""
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
    generate_synthetic(out, num=40, seed=0)
    return out


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


def train(shapes: Path, out: Path, stage: int, *extra: str) -> list[float]:
    config = load_config(
        RECIPE,
        [
            f"model.language_model={shapes}/models/lm",
            f"model.vision.path={shapes}/models/vision",
            f"data.prepared_dir={shapes}",
            f"train.output_dir={out}",
            "train.micro_batch_size=4",
            "train.global_batch_size=4",
            "train.max_steps=4",
            "train.save_every=2",
            f"distributed.zero_stage={stage}",
            *COMMON,
            *extra,
        ],
    )
    return fit(config).losses


def reference(shapes: Path, runs_root: Path, stage: int) -> tuple[Path, list[float]]:
    """A 4-step run with checkpoints at steps 2 and 4, trained once per stage."""
    if stage not in _RUNS:
        out = runs_root / f"zero{stage}"
        _RUNS[stage] = (out, train(shapes, out, stage))
    return _RUNS[stage]


def copy_checkpoint(run: Path, target: Path, step: int = 2) -> Path:
    return Path(shutil.copytree(run / "checkpoints" / f"step-{step}", target / f"step-{step}"))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_resume_bit_exactly_through_weights_only_loads(
    shapes: Path, runs_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: int
) -> None:
    run, expected = reference(shapes, runs_root, stage)
    loads: list[tuple[str, Any]] = []
    real = safe_load_module._ORIGINAL_LOAD

    def spy(path: Any, *args: Any, **kwargs: Any) -> Any:
        loads.append((Path(path).name, kwargs.get("weights_only")))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(safe_load_module, "_ORIGINAL_LOAD", spy)
    checkpoint = run / "checkpoints" / "step-2"
    got = train(shapes, tmp_path / "resumed", stage, f"train.resume={checkpoint}")
    assert got == expected[2:]  # bit-exact: the same floats, not approximately
    assert all(weights_only is True for _, weights_only in loads), loads
    every_file = {p.name for p in checkpoint.rglob("*.pt")}
    assert {name for name, _ in loads} == every_file  # DeepSpeed read nothing around safe_load


def test_every_deepspeed_global_is_allow_listed() -> None:
    assert len(allowed_globals()) == len(DEEPSPEED_GLOBALS)


@pytest.mark.parametrize("victim", ["state/mp_rank_00_model_states.pt", "rng-rank0.pt"])
def test_a_crafted_checkpoint_file_is_refused_and_runs_nothing(
    shapes: Path, runs_root: Path, tmp_path: Path, victim: str
) -> None:
    run, _ = reference(shapes, runs_root, 2)
    checkpoint = copy_checkpoint(run, tmp_path)
    marker = tmp_path / "marker"
    torch.save({"module": PlantMarker(marker)}, checkpoint / victim)
    write_manifest(checkpoint)  # a consistent forgery: the manifest is no signature
    with pytest.raises(CheckpointError) as err:
        train(shapes, tmp_path / "out", 2, f"train.resume={checkpoint}")
    message = str(err.value)
    assert message.startswith(f"{checkpoint / victim}: not a dsvl/DeepSpeed checkpoint")
    assert "unsupported object" in message and "refusing to load it" in message
    assert "\n" not in message and not marker.exists()


def test_a_plain_pickle_is_refused(tmp_path: Path) -> None:
    import pickle

    marker, file = tmp_path / "marker", tmp_path / "states.pt"
    file.write_bytes(pickle.dumps({"x": PlantMarker(marker)}))
    with pytest.raises(CheckpointError, match="not a dsvl/DeepSpeed checkpoint"):
        safe_load(file)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_an_incomplete_checkpoint_named_in_resume_is_one_line(
    shapes: Path, runs_root: Path, tmp_path: Path, damage: str
) -> None:
    run, _ = reference(shapes, runs_root, 2)
    checkpoint = copy_checkpoint(run, tmp_path)
    file = checkpoint / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    if damage == "delete":
        file.unlink()
        expected = "state/zero_pp_rank_0_mp_rank_00_optim_states.pt is missing"
    else:
        size = file.stat().st_size
        with file.open("r+b") as handle:
            handle.truncate(size - 100)
        expected = f"has {size - 100} bytes, {MANIFEST_FILE} says {size}"
    with pytest.raises(CheckpointError) as err:
        find_resume(tmp_path, str(checkpoint))
    message = str(err.value)
    assert "\n" not in message and str(checkpoint) in message and expected in message
    assert "train.resume=auto" in message


def test_a_damaged_checkpoint_without_manifest_is_one_line(
    shapes: Path, runs_root: Path, tmp_path: Path
) -> None:
    """Checkpoints from before manifests: DeepSpeed's AssertionError becomes one line."""
    run, _ = reference(shapes, runs_root, 2)
    checkpoint = copy_checkpoint(run, tmp_path)
    (checkpoint / MANIFEST_FILE).unlink()
    (checkpoint / "state" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError) as err:
        train(shapes, tmp_path / "out", 2, f"train.resume={checkpoint}")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{checkpoint}: DeepSpeed cannot load it")


def test_auto_resume_skips_an_incomplete_newest_checkpoint(
    shapes: Path, runs_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run, _ = reference(shapes, runs_root, 2)
    root = tmp_path / "checkpoints"
    copy_checkpoint(run, root, 2)
    newest = copy_checkpoint(run, root, 4)
    (newest / "rng-rank0.pt").unlink()
    with caplog.at_level(logging.WARNING):
        assert find_resume(tmp_path, "auto") == root / "step-2"
    assert "not resuming from" in caplog.text and "rng-rank0.pt is missing" in caplog.text
