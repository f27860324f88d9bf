"""The parts of the GPU check (`gpu_check.py`): what each runs, and the row it makes of it.

Every part gets the shared `Check` (folders, time limits, settings, what earlier parts produced)
and returns one `PartResult`; a part that needs an earlier one's output and does not find it
returns a skipped row. See `gpu_check.py` for the list and order, `train_check.py` for how the
training numbers are measured.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dsvl_cli.bench import train_check as tc
from dsvl_cli.bench.check_report import FAILED, OK, SKIPPED, CheckReport, PartResult
from dsvl_cli.bench.child import (
    PACKAGE_ROOT,
    ChildResult,
    failure_reason,
    python_command,
    run_child,
)
from dsvl_cli.log import get_logger

log = get_logger(__name__)


@dataclass
class Check:
    """One run of the check: where things go, its limits, and what earlier parts produced."""

    out: Path
    work: Path
    smoke: bool
    deadline: float
    limits: dict[str, float]
    train: tc.TrainSettings
    report: CheckReport
    env: dict[str, str]
    keep_work: bool = False
    data_dir: Path | None = None
    models: dict[str, Any] | None = None

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def child(
        self, cmd: list[str], log_name: str, kind: str, cwd: Path | None = None
    ) -> tuple[ChildResult, float]:
        """Run one child for a part of `kind`; returns (ChildResult, the limit it ran under)."""
        limit = min(self.limits[kind], self.remaining())
        log.info("%s (limit %.0f s): %s", log_name, limit, " ".join(cmd[1:]))
        result = run_child(cmd, self.logs / log_name, limit, cwd=cwd or self.work, env=self.env)
        return result, limit


def _remove(*paths: Path) -> None:
    """Delete a part's result files left by an earlier check into the same --out."""
    for path in paths:
        path.unlink(missing_ok=True)


def _part(name: str, log_name: str, result: ChildResult, limit: float, **fields: Any) -> PartResult:
    """A row for a child that ran: ok, or failed with the child's reason."""
    status = OK if result.ok else FAILED
    reason = "" if result.ok else failure_reason(result, limit)
    row = PartResult(name, status, result.seconds, log=f"logs/{log_name}", reason=reason)
    return replace(row, **fields)


# ----------------------------------------------------------------------------- (a) pytest -m gpu

_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def pytest_counts(output: str) -> dict[str, int]:
    """Counts from pytest's final summary line ("3 passed, 1 skipped in 2.0s"); {} if none."""
    for line in reversed(output.splitlines()):
        found = _COUNT.findall(line)
        if found and " in " in line:
            return {("errors" if k.startswith("error") else k): int(n) for n, k in found}
    return {}


def pytest_part(check: Check) -> PartResult:
    name = "pytest -m gpu"
    tests = PACKAGE_ROOT / "tests"
    if check.smoke:
        return PartResult(name, SKIPPED, reason="--cpu-smoke: the CUDA-only tests need a GPU")
    if not tests.is_dir():
        return PartResult(name, SKIPPED, reason=f"no tests folder at {tests} (installed wheel?)")
    cmd = python_command("-m", "pytest", "-m", "gpu", "-q", str(tests), "-p", "no:cacheprovider")
    result, limit = check.child(cmd, "pytest_gpu.log", "pytest", cwd=PACKAGE_ROOT)
    counts = pytest_counts(result.tail)
    summary = ", ".join(f"{n} {k}" for k, n in counts.items())
    row = _part(name, "pytest_gpu.log", result, limit, numbers=counts, summary=summary)
    if row.status == OK and not counts.get("passed"):
        row = replace(row, status=FAILED, reason="no CUDA test passed")
    return row


# ----------------------------------------------------------------------------- (b) MMCA bench


def mmca_summary(bench: dict[str, Any]) -> str:
    """`SDPA 1,234 tok/s (MFU 40.1%, 30.2 GiB) | MMCA flex ... | ratio 0.97 | |dloss| 1e-3`."""
    cells = []
    for row in bench["results"]:
        extra = []
        if row["mfu"] is not None:
            extra.append(f"MFU {100 * row['mfu']:.1f}%")
        if row["peak_mem_gib"] is not None:
            extra.append(f"{row['peak_mem_gib']:.1f} GiB")
        more = f" ({', '.join(extra)})" if extra else ""
        cells.append(f"{row['kernel']} {row['tokens_per_s']:,.0f} tok/s{more}")
    cells.append(f"MMCA/SDPA {bench['mmca_sdpa_ratio']:.3f}")
    if bench.get("verify_abs_diff") is not None:
        cells.append(f"|loss flex-dense| {bench['verify_abs_diff']:.1e}")
    shape = f"T={bench['seq_len']}, {bench['images']}x{bench['tokens_per_image']} img"
    return f"{shape}, {bench['layers']} layers: " + " | ".join(cells)


def mmca_part(check: Check) -> PartResult:
    name, log_name = "mmca bench", "mmca_bench.log"
    out = check.logs / "mmca_bench.json"
    _remove(out)
    cmd = python_command("-m", "dsvl_cli.bench.mmca", "--verify", "--json", str(out))
    if check.smoke:
        cmd.append("--tiny")
    result, limit = check.child(cmd, log_name, "mmca")
    bench = tc.read_json(out) if result.ok else None
    if result.ok and bench is None:
        return _part(name, log_name, result, limit, status=FAILED, reason=f"{out} not written")
    numbers = bench or {}
    summary = mmca_summary(bench) if bench else ""
    return _part(name, log_name, result, limit, numbers=numbers, summary=summary)


# ----------------------------------------------------------------------------- (c) training


def prepare_part(check: Check) -> PartResult:
    data_dir, num = check.work / "data", tc.synthetic_count(check.train)
    cmd = tc.prepare_command(data_dir, num)
    result, limit = check.child(cmd, "prepare_data.log", "prepare")
    if result.ok:
        check.data_dir = data_dir
    return _part("prepare data", "prepare_data.log", result, limit, summary=f"{num} conversations")


def models_part(check: Check) -> PartResult:
    name, log_name = "build models", "build_models.log"
    if check.data_dir is None:
        return PartResult(name, SKIPPED, reason="needs the prepared data")
    facts_file = check.logs / "models.json"
    _remove(facts_file)
    cmd = tc.models_command(check.data_dir, check.work / "models", check.train.size, facts_file)
    result, limit = check.child(cmd, log_name, "models")
    facts = tc.read_json(facts_file) if result.ok else None
    if facts is None:
        return _part(name, log_name, result, limit)
    check.models = facts
    summary = (
        f"LM {tc.count(facts['lm_params'])} + vision {tc.count(facts['vision_params'])} params, "
        f"vocab {facts['vocab_size']}, {facts['dtype']} on {facts['device']}"
    )
    return _part(name, log_name, result, limit, numbers=facts, summary=summary)


def train_part(check: Check, stage: int) -> PartResult:
    name, log_name = f"train ZeRO-{stage}", f"train_zero{stage}.log"
    if check.data_dir is None or check.models is None:
        return PartResult(name, SKIPPED, reason="needs the prepared data and the built models")
    recipe = check.work / "recipe.yaml"
    tc.write_recipe(recipe, check.data_dir, check.work / "models", check.train)
    run_dir = check.work / "runs" / f"zero{stage}"
    peak_file = check.logs / f"train_zero{stage}.peak.json"
    copied_metrics = check.logs / f"train_zero{stage}.metrics.jsonl"
    _remove(peak_file, copied_metrics)
    cmd = tc.train_command(recipe, run_dir, stage, check.train, peak_file)
    result, limit = check.child(cmd, log_name, "train")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        shutil.copyfile(metrics, copied_metrics)
    records = tc.read_metrics(metrics)
    lm_params = check.models["lm_params"]
    numbers = tc.train_numbers(records, tc.read_json(peak_file), lm_params, check.train.skip_steps)
    numbers["output_dir"] = str(run_dir)
    row = _part(name, log_name, result, limit, numbers=numbers)
    if records:
        row.summary = tc.train_summary(numbers)
    if row.status == OK and not (run_dir / "final" / "meta.json").is_file():
        row.status, row.reason = FAILED, "no export in output_dir/final"
    elif row.status == OK and not numbers["loss_fell"]:
        row.status, row.reason = FAILED, "the eval loss did not fall"
    return row


def reload_part(check: Check, stage: int) -> PartResult:
    name, log_name = f"reload ZeRO-{stage} export", f"reload_zero{stage}.log"
    run_dir = check.work / "runs" / f"zero{stage}"
    final = run_dir / "final"
    if check.data_dir is None or not (final / "meta.json").is_file():
        return PartResult(name, SKIPPED, reason=f"no export from train ZeRO-{stage}")
    facts_file = check.logs / f"reload_zero{stage}.json"
    _remove(facts_file)
    eval_jsonl = check.data_dir / "eval.jsonl"
    cmd = tc.probe_command(final, eval_jsonl, check.train.eval_batch, facts_file)
    result, limit = check.child(cmd, log_name, "reload")
    facts = tc.read_json(facts_file)
    if not check.keep_work:
        shutil.rmtree(run_dir, ignore_errors=True)  # 1B-parameter exports: GBs of disk each
    if facts is None:
        return _part(name, log_name, result, limit)
    records = tc.read_metrics(check.logs / f"train_zero{stage}.metrics.jsonl")
    evals = [r["eval/loss"] for r in records if "eval/loss" in r]
    numbers = tc.reload_numbers(facts, evals[-1] if evals else None)
    row = _part(name, log_name, result, limit, numbers=numbers, summary=tc.reload_summary(numbers))
    if row.status == OK and numbers.get("loss_matches") is False:
        row.status, row.reason = FAILED, "the reloaded eval loss differs from the run's"
    return row
