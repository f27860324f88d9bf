"""Exports and fused folders: no loader accepts an incomplete folder, no writer leaves the only copy
half-written, and nothing non-finite is written.

The issue's input: `best/` replaced by deleting the old folder and renaming the new one in, killed
in between, kept config.yaml and meta.json without model.safetensors, and `dsvl eval best`
exited 0 scoring base weights.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from inference_helpers import make_export
from safetensors.torch import load_file, save_file

from dsvl_cli.atomic import aside_sibling, replace_dir, tmp_sibling
from dsvl_cli.config import validate_config
from dsvl_cli.errors import CheckpointError
from dsvl_cli.model.builder import build_model
from dsvl_cli.model.folder import load_model_folder, open_model_folder
from dsvl_cli.model.manifest import HASH_LIMIT, MANIFEST_FILE, write_manifest
from dsvl_cli.tools.fuse_lora import fuse_lora, write_fused_folder
from dsvl_cli.train.checkpoint import TrainState, repair_exports
from dsvl_cli.train.export import export_model
from dsvl_cli.train.run_dir import clear_run, restore_exports

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny base models and a complete export at `base/export`."""
    return make_export(tmp_path_factory.mktemp("base"))


def copy_export(base: Path, target: Path) -> Path:
    shutil.copytree(base / "export", target)
    return target


def manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_FILE).read_text())["files"]


def test_manifest_lists_every_file_with_its_size(base: Path) -> None:
    export = base / "export"
    files = manifest(export)
    on_disk = {
        p.relative_to(export).as_posix() for p in export.rglob("*") if p.name != MANIFEST_FILE
    }
    assert set(files) == {p for p in on_disk if (export / p).is_file()}
    for rel, entry in files.items():
        assert entry["size"] == (export / rel).stat().st_size
        assert ("sha256" in entry) == (entry["size"] <= HASH_LIMIT)
    assert files["config.yaml"].get("editable") is True


def test_weights_lost_between_delete_and_rename_are_refused(base: Path, tmp_path: Path) -> None:
    best = copy_export(base, tmp_path / "run" / "best")
    (best / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        load_model_folder(best)
    message = str(err.value)
    assert "\n" not in message and str(best) in message
    assert "model.safetensors is missing" in message and "train.resume=auto" in message


def test_eval_of_an_incomplete_export_exits_2_with_one_line(base: Path, tmp_path: Path) -> None:
    best = copy_export(base, tmp_path / "best")
    (best / "model.safetensors").unlink()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "400"}
    result = subprocess.run(
        [sys.executable, "-m", "dsvl_cli", "eval", str(best), "--data", str(base / "eval.jsonl")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.safetensors is missing" in errors[0], result.stderr


def test_truncated_and_changed_files_are_refused(base: Path, tmp_path: Path) -> None:
    export = copy_export(base, tmp_path / "short")
    weights = export / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as handle:
        handle.truncate(size // 2)
    with pytest.raises(CheckpointError, match=f"model.safetensors has {size // 2} bytes"):
        open_model_folder(export)
    changed = copy_export(base, tmp_path / "changed")
    meta = json.loads((changed / "meta.json").read_text())
    (changed / "meta.json").write_text(json.dumps({**meta, "step": 99999}, indent=2) + "\n")
    with pytest.raises(CheckpointError, match="meta.json"):
        open_model_folder(changed)


def test_config_yaml_may_be_edited(base: Path, tmp_path: Path) -> None:
    export = copy_export(base, tmp_path / "edited")
    with (export / "config.yaml").open("a") as handle:
        handle.write("# moved to another machine\n")
    assert open_model_folder(export).path == export


def test_an_export_without_manifest_loads_with_a_warning(
    base: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    export = copy_export(base, tmp_path / "earlier")
    (export / MANIFEST_FILE).unlink()
    with caplog.at_level(logging.WARNING):
        open_model_folder(export)
    assert "has no manifest.json" in caplog.text
    (export / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        open_model_folder(export)


def test_a_missing_lora_adapter_is_refused(tmp_path: Path, base: Path) -> None:
    config = validate_config(
        {
            "model": {
                "language_model": str(base / "models/lm"),
                "vision": {"kind": "clip", "path": str(base / "models/vision")},
            },
            "trainable": {"language_model": "lora", "vision": "frozen"},
        }
    )
    built = build_model(config)
    export_model(built.model, built, config, tmp_path / "lora", {"step": 1})
    adapter = tmp_path / "lora" / "adapters" / "language_model" / "adapter_model.safetensors"
    adapter.unlink()
    (tmp_path / "lora" / MANIFEST_FILE).unlink()  # as an earlier export would be
    with pytest.raises(CheckpointError, match="adapter_model.safetensors is missing"):
        load_model_folder(tmp_path / "lora")


def two_versions(base: Path, run: Path) -> tuple[Path, Path]:
    """`run/best` (step 0) and a complete new copy (step 1) waiting at `.best.tmp`."""
    best = copy_export(base, run / "best")
    new = copy_export(base, tmp_sibling(best))
    meta = json.loads((new / "meta.json").read_text())
    (new / "meta.json").write_text(json.dumps({**meta, "step": 1}, indent=2) + "\n")
    write_manifest(new, editable=("config.yaml",))
    return best, new


def step_of(folder: Path) -> int:
    return json.loads((folder / "meta.json").read_text())["step"]


@pytest.mark.parametrize("kill_at_rename", [1, 2])
def test_a_kill_during_the_swap_leaves_a_complete_copy(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kill_at_rename: int
) -> None:
    run = tmp_path / "run"
    best, new = two_versions(base, run)
    calls, real_rename = [], os.rename

    def rename(src: Path, dst: Path) -> None:
        calls.append(src)
        if len(calls) == kill_at_rename:
            raise KeyboardInterrupt  # the process dies here
        real_rename(src, dst)

    monkeypatch.setattr("dsvl_cli.atomic.os.rename", rename)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(new, best)
    monkeypatch.undo()
    if kill_at_rename == 2:  # best/ renamed aside: loaders name the copy to move back
        with pytest.raises(CheckpointError, match=r"does not exist; a complete copy is at .*mv "):
            open_model_folder(best)
    assert restore_exports(run) == []
    # Killed before best/ moved: best/ is complete and kept. Killed after: the interrupted
    # swap's new copy (complete, fsynced) is published.
    assert step_of(best) == kill_at_rename - 1
    assert not tmp_sibling(best).exists() and not aside_sibling(best).exists()
    load_model_folder(best)


def test_a_kill_while_deleting_the_old_copy_is_cleaned_up(base: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    best, new = two_versions(base, run)
    replace_dir(new, best)
    old = copy_export(base, aside_sibling(best))
    (old / "model.safetensors").unlink()  # killed half way through deleting it
    assert restore_exports(run) == [] and not old.exists() and step_of(best) == 1


def test_an_earlier_dsvl_kill_is_repaired_from_its_tmp(base: Path, tmp_path: Path) -> None:
    """Before this fix: tmp written in full, then best/ deleted (killed half way), then renamed."""
    run = tmp_path / "run"
    best, new = two_versions(base, run)
    for folder in (best, new):
        (folder / MANIFEST_FILE).unlink()
    (best / "model.safetensors").unlink()
    assert restore_exports(run) == []
    assert step_of(best) == 1 and (best / "model.safetensors").is_file()


def test_resume_repair_clears_best_loss_when_best_cannot_be_restored(
    base: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    best = copy_export(base, run / "best")
    copy_export(base, run / "final")
    (best / "model.safetensors").unlink()
    state = TrainState(step=6, best_eval_loss=1.5)
    assert repair_exports(run, state) == ["best"]
    assert state.best_eval_loss is None  # the next evaluation exports best/ again
    intact = TrainState(step=6, best_eval_loss=1.5)
    shutil.rmtree(best)
    copy_export(base, aside_sibling(best))
    assert repair_exports(run, intact) == [] and intact.best_eval_loss == 1.5
    assert step_of(best) == 0


def test_overwrite_clears_aside_copies(base: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    copy_export(base, run / ".best.old")
    copy_export(base, run / ".final.tmp")
    assert sorted(clear_run(run)) == [".best.old", ".final.tmp"]


def test_export_refuses_nonfinite_weights_and_writes_nothing(base: Path, tmp_path: Path) -> None:
    config = validate_config(
        {
            "model": {
                "language_model": str(base / "models/lm"),
                "vision": {"kind": "clip", "path": str(base / "models/vision")},
            }
        }
    )
    built = build_model(config)
    out = copy_export(base, tmp_path / "best")
    before = manifest(out)
    name, param = next((n, p) for n, p in built.model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        param.view(-1)[3] = float("nan")
        param.view(-1)[5] = float("inf")
    with pytest.raises(CheckpointError) as err:
        export_model(built.model, built, config, out, {"step": 2})
    message = str(err.value)
    assert f"tensor {name} holds 2 NaN/Inf value(s)" in message and "lower optim.lr" in message
    assert manifest(out) == before and not tmp_sibling(out).exists()


def test_fused_folder_refuses_nonfinite_weights(base: Path, tmp_path: Path) -> None:
    export = copy_export(base, tmp_path / "export")
    (export / MANIFEST_FILE).unlink()  # so the injected NaN passes the size and hash checks
    tensors = load_file(export / "model.safetensors")
    name = sorted(k for k in tensors if k.startswith("mm_projector."))[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, export / "model.safetensors")
    out = tmp_path / "fused"
    with pytest.raises(CheckpointError, match=f"tensor {name} holds 1 NaN/Inf"):
        fuse_lora(export, out)
    assert not out.exists() and not tmp_sibling(out).exists()
    source = open_model_folder(base / "export")
    built = source.load()
    with torch.no_grad():
        next(built.model.mm_projector.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(CheckpointError, match="tensor mm_projector.* holds 1 NaN/Inf"):
        write_fused_folder(built, source.config, out, {}, "5GB")  # the writer's own check
    assert not out.exists() and not tmp_sibling(out).exists()
