"""Kill a sweep's driver mid-sweep, as a lost head would be: the resume tests' one way of doing it.

`run_and_kill` starts `sweeps/run.py` in its own process group, watches the sweep's saved state in
its storage (what a new head would find) and, once `ready(records)` holds, SIGKILLs the driver
and every process it started (the local Ray, its workers included) and waits until none runs.
It returns the driver's output.
"""

from __future__ import annotations

import contextlib
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
    # Own process group: whatever of the driver's Ray is left when it ends is killed by group id.
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
                _kill_head(proc)
                return
        except (FileNotFoundError, OSError, ValueError):  # no state yet, or a file mid-replace
            pass
        time.sleep(POLL_S)


def _kill_head(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and every process it started, at once, and wait until none runs: a lost
    head leaves nothing behind. Ray's raylet starts each worker in a process group of its own, so
    killing the driver's group alone leaves the trial workers and the evaluator running (seen: for
    seconds), still writing the interrupted trial's checkpoints and files into the sweep's storage
    while the next head resumes it. Collected before the kill: once the raylet is dead its workers'
    parent is init, and nothing says whose they were."""
    doomed = _tree(proc.pid)
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # a process started after the snapshot, in the driver's group
    proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(pid in doomed or pgid == proc.pid for pid, (_, pgid) in _processes().items()):
        time.sleep(0.1)


def _kill_group(proc: subprocess.Popen) -> None:
    """After the wait: a driver that never got ready is killed as well; what is left of its group goes."""
    if proc.poll() is None:
        _kill_head(proc)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, pgid) of every process that runs (zombies, which init may never reap, do not)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if fields[0] != "Z":
            found[int(stat.parent.name)] = (int(fields[1]), int(fields[2]))
    return found


def _tree(root: int) -> set[int]:
    """`root` and its descendants that run now."""
    procs = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree.add(pid)
            todo.extend(children.get(pid, []))
    return tree


def mid_trial(count: int) -> Callable[[list[TrialRecord]], bool]:
    """Ready once `count` trials ended and another one runs with a checkpoint saved: the resumed
    head must continue that trial from its checkpoint, not start it again."""
    # A trial that was running reads back as pending (Tune's saved state says so for a restart).
    return lambda records: ended(records) >= count and any(
        r.row.state in ("running", "pending") and r.result.checkpoint is not None for r in records)
