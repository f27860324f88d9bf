"""The GPU check (`python -m dsvl_cli.bench.gpu_check`): refusal, parsing, report, CPU smoke run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dsvl_cli.bench import check_models, cuda_peak, gpu_check
from dsvl_cli.bench import train_check as tc
from dsvl_cli.bench.check_parts import pytest_counts
from dsvl_cli.bench.check_report import FAILED, OK, SKIPPED, PartResult
from dsvl_cli.bench.child import child_env, failure_reason, run_child

SMOKE_PARTS = [
    "pytest -m gpu",
    "mmca bench",
    "prepare data",
    "build models",
    "train ZeRO-2",
    "reload ZeRO-2 export",
]


def _run_check(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """The check as a user starts it, with no GPU visible whatever this machine has."""
    cmd = [sys.executable, "-m", "dsvl_cli.bench.gpu_check", *args]
    env = child_env({"CUDA_VISIBLE_DEVICES": ""})
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def test_refuses_without_cuda_in_one_line(tmp_path: Path) -> None:
    proc = _run_check("--out", str(tmp_path / "report"), timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: no CUDA GPU is visible")
    assert "--cpu-smoke" in lines[0]
    assert proc.stdout == ""
    assert not (tmp_path / "report").exists()


def test_help_says_what_runs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for needle in ("--cpu-smoke", "pytest -m gpu", "mmca bench", "ZeRO-3", "gpu_check.json"):
        assert needle in text


def test_parts_run_in_the_order_given() -> None:
    args = gpu_check.parse_args(["--parts", "train,pytest", "--zero-stages", "3"])
    names = [name for name, _ in gpu_check.plan(args.parts, args.zero_stages)]
    assert names == [
        "prepare data",
        "build models",
        "train ZeRO-3",
        "reload ZeRO-3 export",
        "pytest -m gpu",
    ]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--parts", "pytest,bogus"])


def test_pytest_counts_reads_the_summary_line() -> None:
    output = (
        "tests/test_mmca.py ..F\nFAILED tests/test_mmca.py::x\n"
        "1 failed, 2 passed, 3 deselected in 9.1s\n"
    )
    assert pytest_counts(output) == {"failed": 1, "passed": 2, "deselected": 3}
    assert pytest_counts("1 error in 0.5s") == {"errors": 1}
    assert pytest_counts("ImportError: No module named pytest") == {}


def _records() -> list[dict]:
    train = [
        {"step": s, "time": 100.0 + s, "train/loss": 6.0 - 0.1 * s, "train/tokens_per_s": rate}
        for s, rate in zip(range(1, 7), (10.0, 20.0, 1000.0, 2000.0, 3000.0, 4000.0), strict=True)
    ]
    return [{"step": 0, "eval/loss": 6.2}, *train, {"step": 6, "eval/loss": 5.1}]


def test_train_numbers_skip_warmup_steps_and_read_the_peak() -> None:
    peak = {"cuda": True, "max_allocated_gib": 20.5, "max_reserved_gib": 24.0}
    numbers = tc.train_numbers(_records(), peak, lm_params=10**9, skip_steps=2)
    assert numbers["tokens_per_s"] == 2500.0  # median of steps 3-6
    assert numbers["tokens_per_s_steps"] == 4
    assert numbers["loop_s"] == 5.0
    assert numbers["loss_fell"] is True
    assert numbers["eval_loss_first"] == 6.2 and numbers["eval_loss_last"] == 5.1
    assert numbers["lm_mfu"] == pytest.approx(6 * 10**9 * 2500.0 / 989e12)
    summary = tc.train_summary(numbers)
    assert "2,500 tok/s" in summary and "20.5 GiB" in summary and "(fell)" in summary


def test_train_numbers_without_cuda_or_metrics() -> None:
    numbers = tc.train_numbers([], {"cuda": False}, lm_params=None, skip_steps=1)
    assert numbers["tokens_per_s"] is None and numbers["loss_fell"] is False
    assert "peak_allocated_gib" not in numbers
    assert "n/a" in tc.train_summary(numbers)


def test_reload_numbers_compare_the_eval_loss() -> None:
    facts = {"logits_finite": True, "logits_shape": [2, 9, 5], "eval_loss": 5.11}
    assert tc.reload_numbers(facts, 5.1)["loss_matches"] is True
    assert tc.reload_numbers(facts, 4.0)["loss_matches"] is False
    assert "loss_matches" not in tc.reload_numbers(facts, None)


def test_enough_synthetic_samples_for_every_step() -> None:
    for settings in (tc.GPU_SETTINGS, tc.SMOKE_SETTINGS):
        train = tc.synthetic_count(settings) * (1 - tc.EVAL_FRACTION)
        assert train >= settings.steps * settings.micro_batch


def test_one_failing_part_does_not_stop_the_others(tmp_path: Path) -> None:
    args = gpu_check.parse_args(["--cpu-smoke", "--out", str(tmp_path / "out")])
    check = gpu_check.make_check(args, tmp_path / "work")

    def broken(_: gpu_check.Check) -> PartResult:
        raise RuntimeError("boom")

    def fine(_: gpu_check.Check) -> PartResult:
        return PartResult("fine", OK, 1.0, summary="42 tok/s")

    def late(c: gpu_check.Check) -> PartResult:
        c.deadline = 0.0  # the budget is spent: the next part is skipped
        return PartResult("late", OK)

    steps = [("broken", broken), ("fine", fine), ("late", late), ("never", fine)]
    report = gpu_check.run_check(check, steps)
    assert [(p.name, p.status) for p in report.parts] == [
        ("broken", FAILED),
        ("fine", OK),
        ("late", OK),
        ("never", SKIPPED),
    ]
    saved = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [p["name"] for p in saved["parts"]] == ["broken", "fine", "late", "never"]
    assert "RuntimeError: boom" in saved["parts"][0]["reason"]
    assert saved["mode"] == "cpu-smoke" and "torch" in saved["versions"]
    text = (tmp_path / "out" / "gpu_check.txt").read_text()
    assert "42 tok/s" in text and "no time left" in text and "torch" in text


def test_child_past_its_limit_is_killed(tmp_path: Path) -> None:
    log = tmp_path / "sleep.log"
    cmd = [sys.executable, "-c", "print('started', flush=True); import time; time.sleep(60)"]
    result = run_child(cmd, log, timeout_s=2)
    assert result.timed_out and not result.ok and result.seconds < 30
    assert failure_reason(result, 2) == "timed out after 2 s"
    assert "started" in log.read_text()
    failed = run_child([sys.executable, "-c", "raise SystemExit('bad input')"], log, 30)
    assert failure_reason(failed, 30) == "exit 1: bad input"


def test_check_models_builds_bf16_folders(tmp_path: Path) -> None:
    from dsvl_cli.demo.synthetic import generate_synthetic

    generate_synthetic(tmp_path / "data", num=8)
    shapes = check_models.SIZES["tiny"]
    cpu = torch.device("cpu")
    facts = check_models.build_check_models(
        tmp_path / "data", tmp_path / "models", shapes, cpu, torch.bfloat16
    )
    assert facts["dtype"] == "bfloat16" and facts["lm_params"] > 0 and facts["vision_params"] > 0
    assert torch.get_default_dtype() == torch.float32  # restored
    for part in ("lm", "vision"):
        with safe_open(tmp_path / "models" / part / "model.safetensors", "pt") as f:
            names = f.keys()  # a safetensors handle is not iterable itself
            assert {f.get_tensor(k).dtype for k in names} == {torch.bfloat16}
    assert (tmp_path / "models" / "vision" / "preprocessor_config.json").is_file()
    assert (tmp_path / "models" / "lm" / "tokenizer.json").is_file()


def test_cuda_peak_writes_its_file_when_dsvl_exits(tmp_path: Path) -> None:
    peak = tmp_path / "peak.json"
    with pytest.raises(SystemExit):
        cuda_peak.main([str(peak), "--version"])
    assert json.loads(peak.read_text()) == {"cuda": False}


def test_cpu_smoke_mmca_part_through_the_command(tmp_path: Path) -> None:
    """The quick slice of the smoke run below: one real child, its row, table and JSON."""
    out = tmp_path / "report"
    proc = _run_check("--cpu-smoke", "--parts", "mmca", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mmca bench" in proc.stdout and "tok/s" in proc.stdout and "Python" in proc.stdout
    saved = json.loads((out / "gpu_check.json").read_text())
    (part,) = saved["parts"]
    assert part["status"] == OK and part["numbers"]["results"][1]["impl"] == "dsvl_mmca"
    assert (out / "logs" / "mmca_bench.log").is_file()


@pytest.mark.slow  # about a minute on 2 CPU cores: five children, each importing torch
def test_cpu_smoke_run_reports_every_part(tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = _run_check("--cpu-smoke", "--out", str(out), timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in SMOKE_PARTS:
        assert name in proc.stdout
    saved = json.loads((out / "gpu_check.json").read_text())
    assert saved["mode"] == "cpu-smoke" and "torch" in saved["versions"]
    parts = {p["name"]: p for p in saved["parts"]}
    assert list(parts) == SMOKE_PARTS
    assert parts["pytest -m gpu"]["status"] == SKIPPED
    assert all(parts[n]["status"] == OK for n in SMOKE_PARTS[1:]), saved["parts"]
    assert parts["mmca bench"]["numbers"]["verify_abs_diff"] < 1e-4
    assert parts["train ZeRO-2"]["numbers"]["loss_fell"] is True
    assert parts["train ZeRO-2"]["numbers"]["tokens_per_s"] > 0
    assert parts["reload ZeRO-2 export"]["numbers"]["logits_finite"] is True
    assert parts["reload ZeRO-2 export"]["numbers"]["loss_matches"] is True
    for part in saved["parts"][1:]:
        assert (out / part["log"]).is_file()
    assert "train ZeRO-2" in (out / "gpu_check.txt").read_text()
