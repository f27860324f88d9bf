"""Rerun the README quick start over seeds and thread counts, timed, and check the demo's goals.

    python -m dsvl_cli.demo.matrix --work demo-matrix --seeds 0 1 2 --threads 1 2

In `--work` it runs the README's commands as a user does (`dsvl` through `python -m dsvl_cli`):
`prepare-data synthetic` once, then for each seed S and thread count T (`OMP_NUM_THREADS=T`)
`dsvl train tiny train.seed=S data.seed=S` (seed 0 is the README command itself: the recipe's
seeds are 0), `dsvl eval` on the held-out set and the README's `dsvl chat` question. Each run
prints one table row: held-out exact match per question type, whether the chat answer is right,
and the wall time of each command. The goals (`GOALS`) are the demo's promise; the script exits 1
when a cell misses one. Results also go to `--work`/matrix.json. Runs are sequential, so wall
times are those of a machine doing nothing else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger("dsvl_cli.demo.matrix")

# Held-out exact match each run must reach, per question type.
GOALS = {"single": 0.95, "two_image": 0.90, "multi_round": 0.90, "caption": 0.95}
NUM = 8000  # the README's `--num`
CHAT_IMAGES = ("data/shapes/images/000811.png", "data/shapes/images/000812.png")
# The README's chat question, about the two images of a held-out conversation (shapes-000495):
# both images hold a blue shape and a square, only the second a blue square: colour alone or
# shape alone cannot answer it.
CHAT_PROMPT = "Which image has a blue square, the first or the second?"
CHAT_ANSWER = "The image with the blue square is the second."


@dataclass
class Cell:
    """One seed x thread-count run of the quick start."""

    seed: int
    threads: int
    accuracy: dict[str, float] = field(default_factory=dict)
    chat: str = ""
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def chat_right(self) -> bool:
        return self.chat.strip() == CHAT_ANSWER

    @property
    def passed(self) -> bool:
        met = all(self.accuracy.get(t, 0.0) >= goal for t, goal in GOALS.items())
        return met and self.chat_right


def _dsvl(args: list[str], work: Path, threads: int, log_file: Path) -> tuple[str, float]:
    """Run `python -m dsvl_cli ARGS` in `work`; (stdout, wall seconds). Fails loudly."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "dsvl_cli", *args], cwd=work, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    log_file.write_text(done.stdout + done.stderr, encoding="utf-8")
    if done.returncode != 0:
        raise SystemExit(f"dsvl {' '.join(args)} exited {done.returncode}; see {log_file}")
    return done.stdout, seconds


def run_cell(work: Path, seed: int, threads: int, overrides: list[str]) -> Cell:
    """Train (with `overrides`), evaluate and chat for one seed and thread count."""
    cell, name = Cell(seed, threads), f"s{seed}-t{threads}" + "".join(f"-{o}" for o in overrides)
    out, logs = Path("outputs") / f"tiny-{name}", work / "logs"
    seeds = [f"train.seed={seed}", f"data.seed={seed}"] if seed else []
    args = ["train", "tiny", f"train.output_dir={out}", "train.overwrite=true", *seeds, *overrides]
    cell.seconds["train"] = _dsvl(args, work, threads, logs / f"{name}-train.log")[1]
    results = Path("eval-results") / name
    args = ["eval", str(out / "final"), "--data", "data/shapes/eval.jsonl"]
    args += ["--max-new-tokens", "12", "--out", str(results)]
    cell.seconds["eval"] = _dsvl(args, work, threads, logs / f"{name}-eval.log")[1]
    metrics = json.loads((work / results / "metrics.json").read_text(encoding="utf-8"))
    cell.accuracy = {t: v["accuracy"] for t, v in metrics["accuracy"]["by_type"].items()}
    args = ["chat", str(out / "final"), "--images", *CHAT_IMAGES, "--prompt", CHAT_PROMPT]
    answer, cell.seconds["chat"] = _dsvl(args, work, threads, logs / f"{name}-chat.log")
    cell.chat = answer.strip().splitlines()[-1] if answer.strip() else ""
    return cell


def row(cell: Cell) -> str:
    """A markdown table row: accuracies, chat, wall times."""
    acc = " | ".join(f"{100 * cell.accuracy.get(t, 0.0):.1f} %" for t in GOALS)
    secs = cell.seconds
    times = f"{secs['train']:.0f} s | {secs['eval'] + secs['chat']:.0f} s"
    chat = "right" if cell.chat_right else f"wrong: {cell.chat!r}"
    return f"| {cell.seed} | {cell.threads} | {acc} | {chat} | {times} |"


HEADER = (
    "| seed | threads | single | two images | multi-round | caption | chat | train "
    "| eval + chat |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("demo-matrix"), help="working folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument(
        "--override", action="append", default=[], help="train key=value (e.g. model.mmca=false)"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = args.work.absolute()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    prepare = ["prepare-data", "synthetic", "--out", "data/shapes", "--num", str(NUM)]
    seconds = _dsvl(prepare, work, max(args.threads), work / "logs" / "prepare.log")[1]
    log.info("prepare-data: %.0f s\n%s", seconds, HEADER)
    cells = []
    for seed in args.seeds:
        for threads in args.threads:
            cells.append(run_cell(work, seed, threads, args.override))
            log.info("%s", row(cells[-1]))
    report = {"goals": GOALS, "prepare_seconds": seconds, "overrides": args.override}
    report["cells"] = [asdict(c) for c in cells]
    (work / "matrix.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    missed = [c for c in cells if not c.passed]
    log.info("%d of %d runs met every goal", len(cells) - len(missed), len(cells))
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
