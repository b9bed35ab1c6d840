"""One line per trial event on the driver's console, so people see the sweep move."""

from __future__ import annotations

import time

from ray.tune import Callback

from sweeps.results import FAILED_KEY, SHOWN_METRICS
from toyworld.oracle import ORACLE_METRICS

_EXACT = tuple(m for m in SHOWN_METRICS if m in ORACLE_METRICS)  # shown when the sweep has the oracle


class ProgressPrinter(Callback):
    def __init__(self, metric: str):
        self.metric = metric
        self.start = time.monotonic()

    def _stamp(self) -> str:
        return f"[{time.monotonic() - self.start:6.1f}s]"

    def on_trial_start(self, iteration, trials, trial, **info):
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted((trial.config or {}).items()))
        print(f"{self._stamp()} trial {trial.trial_id} started: {params}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get(FAILED_KEY):
            print(f"{self._stamp()} trial {trial.trial_id} FAILED: {result[FAILED_KEY]} (not retried: it would fail again)",
                  flush=True)
            return
        exact = "".join(f" {m}={_fmt(result[m])}" for m in _EXACT if m != self.metric and m in result)
        print(
            f"{self._stamp()} trial {trial.trial_id} step {result.get('step')}: "
            f"{self.metric}={_fmt(result.get(self.metric))}{exact} loss={_fmt(result.get('loss'))}",
            flush=True,
        )

    def on_trial_complete(self, iteration, trials, trial, **info):
        if (trial.last_result or {}).get(FAILED_KEY):
            return  # its FAILED line is printed
        print(f"{self._stamp()} trial {trial.trial_id} finished", flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        print(f"{self._stamp()} trial {trial.trial_id} failed ({_last_error_line(trial)}); "
              "retrying from its last checkpoint", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"{self._stamp()} trial {trial.trial_id} FAILED: {_last_error_line(trial)}", flush=True)


def _last_error_line(trial) -> str:
    """The exception line of the trial's error file, e.g. `TrialFailed: training diverged: loss became nan ...`."""
    try:
        with open(trial.error_file) as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except (OSError, TypeError):
        return "see the trial's error.txt"
    own = [ln for ln in lines if "TrialFailed:" in ln]  # our one-line reason, when the trial gave one
    line = own[-1].split("TrialFailed:", 1)[1].strip() if own else (lines[-1] if lines else "see the trial's error.txt")
    return line[:300]


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
