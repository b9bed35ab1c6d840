"""Kill a sweep's driver mid-sweep, as a lost head would be: the resume tests' one way of doing it.

`run_and_kill` starts `sweeps/run.py` in its own process group, watches the sweep's saved state in
its storage (what a new head would find) and SIGKILLs the driver and the local Ray it started once
`ready(records)` holds. It returns the driver's output.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sweeps.results import TrialRecord, load_records

ENDED = ("complete", "pruned")  # the demo spec's median pruner may stop trials early
POLL_S = 0.25  # between reads of the saved state


def ended(records: list[TrialRecord]) -> int:
    return sum(r.row.state in ENDED for r in records)


def finished(count: int) -> Callable[[list[TrialRecord]], bool]:
    """Ready once `count` trials ended."""
    return lambda records: ended(records) >= count


def run_and_kill(cmd: list[str], spec, ready: Callable[[list[TrialRecord]], bool], cwd: Path | None = None,
                 env: dict[str, str] | None = None, timeout_s: float = 500) -> str:
    """Start the sweep, SIGKILL its driver once `ready` holds for the saved state; the driver's output.
    `env`: added to this process's environment for the driver."""
    # Own process group: the Ray processes the driver started are killed with it by group id.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=cwd,
                            env={**os.environ, **(env or {})})
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        _wait_then_kill(proc, spec, ready, timeout_s)
        proc.wait(timeout=60)
    finally:
        _kill_group(proc)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)[-3000:]
    return "".join(lines)


def _wait_then_kill(proc: subprocess.Popen, spec, ready, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if ready(load_records(spec)):
                proc.send_signal(signal.SIGKILL)
                return
        except (FileNotFoundError, OSError, ValueError):  # no state yet, or a file mid-replace
            pass
        time.sleep(POLL_S)


def _kill_group(proc: subprocess.Popen) -> None:
    """The driver, then every process of its group (Ray's GCS, raylet, workers), and wait until
    none is left: a worker still alive would keep writing into the sweep the next head resumes."""
    proc.kill()
    proc.wait(timeout=60)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _alive_in_group(proc.pid):
        time.sleep(0.1)


def _alive_in_group(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (zombies, which init may never reap, do not)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def mid_trial(count: int) -> Callable[[list[TrialRecord]], bool]:
    """Ready once `count` trials ended and another one runs with a checkpoint saved: the resumed
    head must continue that trial from its checkpoint, not start it again."""
    # A trial that was running reads back as pending (Tune's saved state says so for a restart).
    return lambda records: ended(records) >= count and any(
        r.row.state in ("running", "pending") and r.result.checkpoint is not None for r in records)
