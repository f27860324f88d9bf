"""Child processes of the GPU check: one command, a time limit, everything it prints in a file.

Each part of `python -m dsvl_cli.bench.gpu_check` runs in its own process so that a hang can be
killed at its time limit, a crash (or a CUDA error that poisons the process) cannot take the other
parts with it, and each part's GPU memory is its own. The child starts a new session, so on
timeout its whole process group (DataLoader workers, compile workers) is ended, not just the
Python process we started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dsvl_cli
from dsvl_cli.log import get_logger

log = get_logger(__name__)

# Where `import dsvl_cli` resolves: children need it on their path whether or not dsvl is
# pip-installed (on the GPU machines it is not; PYTHONPATH points at a checkout).
PACKAGE_ROOT = Path(dsvl_cli.__file__).resolve().parents[1]
TAIL_CHARS = 2000
KILL_GRACE_S = 10.0


@dataclass(frozen=True)
class ChildResult:
    """How one child process ended.

    Attributes:
        returncode: its exit status (None when it was killed at the time limit).
        seconds: wall time from start to exit (or kill).
        timed_out: it ran past its limit and was killed.
        tail: the last TAIL_CHARS characters of its combined stdout + stderr.
    """

    returncode: int | None
    seconds: float
    timed_out: bool
    tail: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def python_command(*args: str) -> list[str]:
    """`[this interpreter, *args]`: children use the same Python and site-packages as we do."""
    return [sys.executable, *args]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment with dsvl's root first on PYTHONPATH, offline, no colour codes in logs."""
    env = dict(os.environ)
    paths = [str(PACKAGE_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["NO_COLOR"] = "1"  # rich honours it: plain text in the log files
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Every model is a local folder; a hub lookup on a machine without network only hangs.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.update(extra or {})
    return env


def _read_tail(log_file: Path) -> str:
    try:
        text = log_file.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return text[-TAIL_CHARS:]


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child's process group, then SIGKILL whatever is left after a grace period."""
    for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_child(
    cmd: Sequence[str],
    log_file: Path,
    timeout_s: float,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> ChildResult:
    """Run `cmd` with stdout + stderr written to `log_file`; kill it after `timeout_s` seconds."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "wb") as out:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        start = time.monotonic()
        proc = subprocess.Popen(
            list(cmd),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=env or child_env(),
            start_new_session=True,
        )
        try:
            code: int | None = proc.wait(timeout=max(timeout_s, 1.0))
            timed_out = False
        except subprocess.TimeoutExpired:
            log.warning("%s: past its %.0f s limit, stopping it", " ".join(cmd[:4]), timeout_s)
            _kill_group(proc)
            code, timed_out = None, True
        seconds = time.monotonic() - start
    return ChildResult(code, seconds, timed_out, _read_tail(log_file))


def failure_reason(result: ChildResult, timeout_s: float) -> str:
    """One line: timed out, or the exit status with the last non-empty line the child printed."""
    if result.timed_out:
        return f"timed out after {timeout_s:.0f} s"
    lines = [line.strip() for line in result.tail.splitlines() if line.strip()]
    last = lines[-1] if lines else "no output"
    return f"exit {result.returncode}: {last[:300]}"
