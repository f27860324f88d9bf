"""`dsvl train` on real DeepSpeed (CPU): ZeRO stages, exports, exact resume after SIGKILL."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import tiny_overrides as overrides  # noqa: E402

from dsvl_cli.config import load_config
from dsvl_cli.demo.synthetic import generate_synthetic
from dsvl_cli.model.folder import load_model_folder
from dsvl_cli.train.checkpoint import find_resume
from dsvl_cli.train.launch import launcher_command
from dsvl_cli.train.trainer import fit

ROOT = Path(__file__).parent.parent
RECIPE = ROOT / "recipes" / "tiny.yaml"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    generate_synthetic(out, num=60, seed=0)
    return out


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_zero_stages_train_evaluate_and_export(shapes: Path, tmp_path: Path, stage: int) -> None:
    config = load_config(
        RECIPE,
        overrides(shapes, tmp_path, "train.max_steps=3", f"distributed.zero_stage={stage}"),
    )
    result = fit(config)
    assert result.steps == 3 and len(result.losses) == 3
    assert all(loss == loss and loss > 0 for loss in result.losses)
    for name in ("best", "final"):
        folder = tmp_path / name
        assert {"config.yaml", "meta.json", "model.safetensors"} <= {
            p.name for p in folder.iterdir()
        }
    assert (tmp_path / "checkpoints").exists() or config.train.save_every > 3
    built = load_model_folder(tmp_path / "final")
    assert built.model.tokens_per_image == 5  # 2 x 2 patches of 16 pixels + CLS
    assert (tmp_path / "blend.json").is_file() and (tmp_path / "config.yaml").is_file()


def test_loss_falls_on_the_synthetic_task(shapes: Path, tmp_path: Path) -> None:
    config = load_config(RECIPE, overrides(shapes, tmp_path, "train.max_steps=30"))
    result = fit(config)
    first, last = result.losses[0], sum(result.losses[-5:]) / 5
    assert last < 0.6 * first, result.losses


def _run_cli(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # each CLI run sets up its own single-process group
    return subprocess.Popen(
        [sys.executable, "-m", "dsvl_cli", "train", str(RECIPE), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _last_logged_step(out: Path) -> int:
    """The newest step in metrics.jsonl while another process writes it (partial lines ignored)."""
    path, last = out / "metrics.jsonl", 0
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):
            last = max(last, json.loads(line)["step"])
    return last


def test_resume_after_sigkill_equals_uninterrupted(shapes: Path, tmp_path: Path) -> None:
    # A constant schedule so both runs see the same lr whatever their total step count.
    common = ("optim.schedule=constant", "optim.warmup_ratio=null", "train.save_every=3")
    full, cut = tmp_path / "full", tmp_path / "cut"
    reference = _run_cli(*overrides(shapes, full, "train.max_steps=9", *common))
    output, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, output
    victim = _run_cli(
        *overrides(shapes, cut, "train.max_steps=500", "train.keep_last=100", *common)
    )
    deadline = time.time() + 240
    # Kill once steps after the checkpoint are logged: they must not appear twice after resume.
    while not (cut / "checkpoints" / "step-3" / "trainer_state.json").exists() or (
        _last_logged_step(cut) < 5
    ):
        assert victim.poll() is None and time.time() < deadline, victim.communicate()[0]
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed = _run_cli(
        *overrides(shapes, cut, "train.max_steps=9", f"train.resume={cut}/checkpoints/step-3"),
        *common,
    )
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    expected, got = losses(full), losses(cut)
    for step in range(1, 10):
        assert got[step] == pytest.approx(expected[step], abs=1e-6), (step, expected, got)
    records = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    for series in ("train/loss", "eval/loss"):
        steps = [r["step"] for r in records if series in r]
        assert steps == sorted(set(steps)), (series, steps)  # strictly increasing, no repeats


def test_resume_ignores_half_written_checkpoints(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    (root / "step-3").mkdir(parents=True)
    (root / "step-3" / "trainer_state.json").write_text("{}")
    (root / ".tmp-step-6" / "state").mkdir(parents=True)  # killed during a save
    (root / "step-9").mkdir()  # renamed without its state file: never produced, but guard anyway
    assert find_resume(tmp_path, "auto") == root / "step-3"
    assert find_resume(tmp_path, "never") is None


def test_launcher_command_relaunches_through_deepspeed(tmp_path: Path) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
    cmd = launcher_command(RECIPE, ["optim.lr=1e-4"], 8, hostfile, "node1", 29600)
    assert "--hostfile" in cmd and "--num_gpus" in cmd and "--no_local_rank" in cmd
    assert cmd[-4:] == ["dsvl_cli", "train", str(RECIPE), "optim.lr=1e-4"]
    assert cmd[cmd.index("--master_port") + 1] == "29600"


@pytest.mark.slow
def test_two_processes_through_the_launcher(shapes: Path, tmp_path: Path) -> None:
    args = overrides(shapes, tmp_path, "train.max_steps=2", "train.global_batch_size=8")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = launcher_command(RECIPE, args, 2, None, None, None)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_nonfinite_loss_stops_with_a_clear_error(shapes: Path, tmp_path: Path) -> None:
    from dsvl_cli.train.trainer import TrainingError

    extra = (
        "train.max_steps=6",
        "optim.lr=1e30",
        "optim.warmup_ratio=null",
        "train.on_nonfinite=stop",
    )
    with pytest.raises(TrainingError, match="non-finite loss at step"):
        fit(load_config(RECIPE, overrides(shapes, tmp_path, *extra)))


def test_lr_1e30_stops_with_one_line_and_exports_nothing(shapes: Path, tmp_path: Path) -> None:
    """The reported run: loss 6.1, then 0.0 forever, exit 0, NaN weights in final/ (before)."""
    args = overrides(shapes, tmp_path, "train.max_steps=5", "optim.lr=1e30")
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    done = subprocess.run(
        [sys.executable, "-m", "dsvl_cli", "train", str(RECIPE), *args, "optim.warmup_ratio=null"],
        capture_output=True,
        text=True,
        env={**env, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "learning rate is too high" in errors[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "final").exists()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r["train/loss"] for r in records if "train/loss" in r]
    assert logged and all(loss is None or loss > 0.1 for loss in logged)  # never a fake 0.0


def test_one_nonfinite_micro_batch_is_skipped(
    shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """on_nonfinite=skip: the bad micro-batch's step applies no update; training goes on."""
    from dsvl_cli.model.vlm import VisualChatModel

    forward, calls = VisualChatModel.forward, {"n": 0}

    def poisoned(self, *args, **kwargs):  # the 3rd training forward gives a NaN loss
        out = forward(self, *args, **kwargs)
        if (
            self.training
            and kwargs.get("labels") is not None
            and kwargs.get("pixel_values") is not None
        ):
            calls["n"] += 1
            if calls["n"] == 3:
                out.loss_sum = out.loss_sum * float("nan")
        return out

    monkeypatch.setattr(VisualChatModel, "forward", poisoned)
    result = fit(load_config(RECIPE, overrides(shapes, tmp_path, "train.max_steps=5")))
    assert result.steps == 5
    assert [loss != loss for loss in result.losses] == [False, False, True, False, False]
    assert (tmp_path / "final" / "model.safetensors").is_file()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    step3 = next(r for r in records if r["step"] == 3 and "train/loss" in r)
    assert step3["train/loss"] is None and step3["train/nonfinite_skipped_batches"] == 1


def test_a_half_replaced_best_is_refused_and_resume_restores_it(
    shapes: Path, tmp_path: Path
) -> None:
    """A kill between moving the old best/ aside and moving the new one in, as the old writer
    left it: config.yaml and meta.json without weights."""
    from dsvl_cli.errors import CheckpointError
    from dsvl_cli.model.folder import open_model_folder

    args = overrides(shapes, tmp_path, "train.max_steps=4", "train.save_every=2")
    fit(load_config(RECIPE, args))
    best = tmp_path / "best"
    meta = json.loads((best / "meta.json").read_text())
    best.rename(tmp_path / ".best.old")
    best.mkdir()
    for name in ("config.yaml", "meta.json"):
        (best / name).write_bytes((tmp_path / ".best.old" / name).read_bytes())
    with pytest.raises(CheckpointError) as err:
        open_model_folder(best)
    assert "\n" not in str(err.value) and str(best) in str(err.value)
    last = tmp_path / "checkpoints" / "step-4"
    fit(load_config(RECIPE, [*args, f"train.resume={last}"]))
    assert open_model_folder(best).meta["step"] == meta["step"]
    assert not (tmp_path / ".best.old").exists()


def test_training_without_eval_data_exports_final(shapes: Path, tmp_path: Path) -> None:
    """No eval split: no evaluation, no best/, final/ exported (was: NaN eval, exit 2)."""
    extra = ("train.max_steps=2", "data.eval_file=null", "data.eval_fraction=0")
    result = fit(load_config(RECIPE, overrides(shapes, tmp_path, *extra)))
    assert result.steps == 2 and result.eval_loss is None
    assert (tmp_path / "final" / "manifest.json").is_file() and not (tmp_path / "best").exists()
