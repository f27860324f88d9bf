"""One GPU check: the CUDA tests, the MMCA benchmark and real training runs, in one table.

    python -m dsvl_cli.bench.gpu_check --out gpu-check        # on a machine with a CUDA GPU
    python -m dsvl_cli.bench.gpu_check --cpu-smoke --out DIR  # tiny CPU versions (for tests)

Parts, in the default order (--parts picks and orders them; each part runs in its own process,
with its own time limit, all within --budget-s):

1. pytest -m gpu: the CUDA-only tests under tests/ (passed / failed / skipped counts).
2. mmca bench: `dsvl_cli.bench.mmca --verify` (LLaMA-2-7B-shaped decoder, T=4096, 8 images x
   256 tokens; MMCA flex vs causal SDPA: tokens/s, MFU, peak memory, |loss(flex) - loss(dense)|).
3. prepare data: `dsvl prepare-data synthetic` (images, conversations, tokenizer).
4. build models: random-weight ~1.0B LLaMA-shaped LM + CLIP ViT-L/14-shaped tower (bf16).
5. train ZeRO-2, train ZeRO-3: `dsvl train` in bf16 for --train-steps steps each (tokens/s, peak
   memory, whether the loss fell); see dsvl_cli/bench/train_check.py for how each is measured.
6. reload ZeRO-N export: output_dir/final reloaded with the library's loader: finite logits, and
   its eval loss against the run's.

A part that fails or runs out of time is a failed row with its reason, and the others still run;
parts that need an earlier one (training needs the data and models) are skipped rows. With
--cpu-smoke the same parts run on the CPU with tiny shapes in fp32, ZeRO-2 only, and pytest -m gpu
is a skipped row. Without CUDA and without --cpu-smoke the check refuses in one line (exit 2).

Written to --out (after every part, so a stopped check keeps what it finished): gpu_check.txt
(the table), gpu_check.json (versions, every number, reasons), logs/ (each part's full output,
the runs' metrics.jsonl, the benchmark's JSON). Exit status 0 when no part failed, else 1.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from dsvl_cli.bench import train_check as tc
from dsvl_cli.bench.check_parts import (
    Check,
    mmca_part,
    models_part,
    prepare_part,
    pytest_part,
    reload_part,
    train_part,
)
from dsvl_cli.bench.check_report import (
    FAILED,
    SKIPPED,
    CheckReport,
    PartResult,
    collect_versions,
    table,
    write_report,
)
from dsvl_cli.bench.child import child_env
from dsvl_cli.errors import DsvlError
from dsvl_cli.log import console, get_logger, setup_logging

log = get_logger(__name__)

PARTS = ("pytest", "mmca", "train")
# Seconds each kind of part may take; a GPU loan is ~15 minutes, of which ~9 are the check's.
GPU_LIMITS = {"pytest": 90, "mmca": 180, "prepare": 60, "models": 120, "train": 180, "reload": 90}
# CPU smoke: tiny shapes, but every child pays seconds for importing torch and transformers.
SMOKE_LIMITS = {"mmca": 240, "prepare": 240, "models": 240, "train": 420, "reload": 240}
GPU_BUDGET_S, SMOKE_BUDGET_S = 530.0, 1500.0
MIN_PART_S = 15.0  # a part is skipped when less than this is left of the budget


Step = tuple[str, Callable[[Check], PartResult]]


class NoCudaError(DsvlError):
    """The GPU check was started where no CUDA GPU is visible (and without --cpu-smoke)."""


# ----------------------------------------------------------------------------- running


def plan(parts: Sequence[str], stages: Sequence[int]) -> list[Step]:
    """(row name, part function) for the chosen parts, in the order given, and ZeRO stages."""
    steps: list[Step] = []
    for part in parts:
        if part == "pytest":
            steps.append(("pytest -m gpu", pytest_part))
        elif part == "mmca":
            steps.append(("mmca bench", mmca_part))
        elif part == "train":
            steps += [("prepare data", prepare_part), ("build models", models_part)]
            for stage in stages:
                steps.append((f"train ZeRO-{stage}", functools.partial(train_part, stage=stage)))
                reload = functools.partial(reload_part, stage=stage)
                steps.append((f"reload ZeRO-{stage} export", reload))
    return steps


def run_step(check: Check, name: str, step: Callable[[Check], PartResult]) -> PartResult:
    """Run one part; any error inside it becomes its failed row, never the end of the check."""
    if check.remaining() < MIN_PART_S:
        return PartResult(name, SKIPPED, reason="no time left in --budget-s")
    start = time.monotonic()
    try:
        return step(check)
    except Exception as err:  # one part's bug (in the check itself) must not cost the others
        log.exception("%s: crashed in the check itself", name)
        reason = f"check error: {type(err).__name__}: {err}"
        return PartResult(name, FAILED, time.monotonic() - start, reason=reason[:300])


def run_check(check: Check, steps: list[Step]) -> CheckReport:
    """Run every step in order, rewriting the report files after each."""
    start = time.monotonic()
    for name, step in steps:
        row = run_step(check, name, step)
        log.info("%s: %s in %.0f s %s", name, row.status, row.seconds, row.reason)
        check.report.parts.append(row)
        check.report.total_s = time.monotonic() - start
        write_report(check.report, check.out)
    return check.report


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Flags; --help prints the module docstring (what runs, what is written, exit status)."""
    p = argparse.ArgumentParser(
        prog="python -m dsvl_cli.bench.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("gpu-check"), help="report folder")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny CPU versions of every part")
    p.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}, run in order"
    )
    p.add_argument("--zero-stages", type=_int_list, default=None, help="default 2,3 (smoke: 2)")
    p.add_argument("--train-steps", type=int, default=None, help="default 30 (smoke: 3)")
    p.add_argument(
        "--train-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra dsvl train override, repeatable (e.g. model.mmca.impl=dense)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help=f"seconds for all parts; default {GPU_BUDGET_S:.0f} (smoke: {SMOKE_BUDGET_S:.0f})",
    )
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch folder and runs")
    args = p.parse_args(argv)
    args.parts = tuple(dict.fromkeys(v.strip() for v in args.parts.split(",") if v.strip()))
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        p.error(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args.zero_stages and not set(args.zero_stages) <= {0, 1, 2, 3}:
        p.error("--zero-stages: give stages 0-3, e.g. 2,3")
    return args


def require_cuda() -> None:
    """NoCudaError (one line) when no CUDA GPU is visible."""
    import torch

    if not torch.cuda.is_available():
        raise NoCudaError(
            "no CUDA GPU is visible: run the GPU check on a machine with one, or pass --cpu-smoke "
            "for tiny CPU versions of its parts"
        )


def make_check(args: argparse.Namespace, work: Path) -> Check:
    """The check's settings from the flags (smoke or GPU defaults, then the overrides)."""
    smoke = args.cpu_smoke
    settings = tc.SMOKE_SETTINGS if smoke else tc.GPU_SETTINGS
    if args.zero_stages:
        settings = replace(settings, stages=args.zero_stages)
    if args.train_steps:
        settings = replace(settings, steps=args.train_steps)
    settings = replace(settings, overrides=tuple(args.train_override))
    budget = args.budget_s or (SMOKE_BUDGET_S if smoke else GPU_BUDGET_S)
    # Smoke children must not find a GPU either: "tiny CPU versions" whatever the machine.
    env = child_env({"CUDA_VISIBLE_DEVICES": ""} if smoke else None)
    report = CheckReport("cpu-smoke" if smoke else "gpu", collect_versions(), budget)
    limits = dict(SMOKE_LIMITS if smoke else GPU_LIMITS)
    deadline = time.monotonic() + budget
    out = args.out.resolve()
    return Check(out, work, smoke, deadline, limits, settings, report, env, args.keep_work)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check, print the table, write the report; the exit status (0 ok, 1 a part failed)."""
    args = parse_args(argv)
    if not args.cpu_smoke:
        require_cuda()
    work = args.work or Path(tempfile.mkdtemp(prefix="dsvl-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    check = make_check(args, work.resolve())
    try:
        report = run_check(check, plan(args.parts, check.train.stages))
    finally:
        if args.work is None and not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    Console(soft_wrap=False, width=160).print(table(report))
    log.info("report: %s", check.out / "gpu_check.txt")
    return 1 if report.failed else 0


def entry() -> None:
    """`python -m dsvl_cli.bench.gpu_check`: DsvlError -> one red line on stderr, exit 2."""
    setup_logging()
    try:
        code = main()
    except DsvlError as err:
        console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
