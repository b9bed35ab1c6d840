"""The sweep's trials as read back from its storage: rows for the results table, scored checkpoints for export.

Read from Ray's experiment state (ExperimentAnalysis), so the same code serves the end of a
sweep, `--status` while another driver runs it, and `--export-only` over a finished one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from ray import tune
from ray.tune import ExperimentAnalysis, ResultGrid

from sweeps import storage
from sweeps.bill import format_bill, sweep_bill
from sweeps.spec_checks import TRIAL_METRICS
from sweeps.spec_schema import SweepSpec

EXPERIMENT = "tune"  # Ray's experiment folder inside the sweep folder
FAILURES = "failures"  # <sweep>/failures/<trial id>.json: why a trial failed for good (see trainable)
FAILED_KEY = "failed"  # in a trial's last result: why it failed for good (Tune ended it without retries)
# What every trial checkpoint holds (written by sweeps.trainable, copied by sweeps.export).
LORA_DIFFUSERS = "lora_diffusers.safetensors"
LORA_KOHYA = "lora_kohya.safetensors"
SAMPLES_FILE = "samples.png"
BASE_SAMPLES = "base_samples.png"  # <sweep>/base_samples.png: the base model on the eval prompts (sweeps.trainable)
TRIAL_INFO = "trial.json"  # params, metrics, prompts and seeds of the checkpoint's evaluation
STATE_DIR = "state"  # the trainer's exact state (safetensors + JSON)
# Shown beside the objective in the trials table when trials report them: the CLIP score
# everywhere, the oracle's accuracies in the toy world only (eval.oracle), and CMMD where the suite
# has training images to compare with (of the distribution metrics, the one to read at a suite's
# ~20 images). Few, so that the default table stays narrow: `--columns` shows any of TABLE_COLUMNS.
SHOWN_METRICS = ("clip_score", "concept_accuracy", "prior_accuracy", "cmmd")
# What a table column may name: every metric a trial reports, and the trainer's lr and speed.
TABLE_COLUMNS = (*TRIAL_METRICS, "lr", "images_per_sec")
STATES = {"RUNNING": "running", "PENDING": "pending", "PAUSED": "pending", "ERROR": "failed", "TERMINATED": "complete"}


@dataclass
class TrialRow:
    trial_id: str
    params: dict
    objective: float | None
    state: str
    steps: int | None
    wall_s: float | None
    reason: str | None = None
    budget: int | None = None  # the trial's step budget (max_train_steps), when known
    values: dict = field(default_factory=dict)  # best checkpoint's value of every objective
    metrics: dict = field(default_factory=dict)  # best checkpoint's value of every number it reported
    startup_s: float | None = None  # from the trial's start to its first training step (sweeps.trainable)


@dataclass
class TrialRecord:
    row: TrialRow
    result: tune.Result


def sweep_uri(spec: SweepSpec) -> str:
    """The sweep's folder in its storage (local path or URI): experiment, failures, export."""
    return storage.join(spec.storage_uri, spec.name)


def experiment_path(spec: SweepSpec) -> str:
    return storage.join(sweep_uri(spec), EXPERIMENT)


def load_records(spec: SweepSpec, trials: list | None = None) -> list[TrialRecord]:
    """Every trial of the sweep, read from its storage, in creation order; `trials`: a running
    sweep's in-memory Tune trials instead of its last saved experiment state (sweeps.report)."""
    experiment = experiment_path(spec)
    if not tune.Tuner.can_restore(experiment):
        raise FileNotFoundError(f"{experiment}: no sweep state here yet (has the sweep started? is `storage:` right?)")
    analysis = ExperimentAnalysis(experiment, trials=trials)
    grid = ResultGrid(analysis)
    pruned = _pruned_trials(spec, experiment)
    failures = storage.join(sweep_uri(spec), FAILURES)
    records = [TrialRecord(_row(trial, result, spec, pruned, failures), result) for trial, result in zip(analysis.trials, grid)]
    # Ray's experiment state does not keep the order trials were created in; the study numbers them.
    number = _study_numbers(spec)
    return sorted(records, key=lambda r: number.get(r.row.trial_id, len(number)))


def _study_numbers(spec: SweepSpec) -> dict[str, int]:
    """Tune trial id -> the Optuna trial number the searcher gave it (the order it proposed them)."""
    from sweeps.study_storage import RAY_TRIAL_ATTR, load_sweep_study

    study = load_sweep_study(spec)
    if study is None:  # no study yet
        return {}
    return {t.user_attrs[RAY_TRIAL_ATTR]: t.number for t in study.trials if RAY_TRIAL_ATTR in t.user_attrs}


def _row(trial, result: tune.Result, spec: SweepSpec, pruned: set[str], failures: str) -> TrialRow:
    last = trial.last_result or {}
    scored = scored_checkpoints(result, spec)
    state = STATES.get(trial.status, trial.status.lower())
    reason = None
    if last.get(FAILED_KEY):  # failed for good: Tune ended it normally, without retries
        state, reason = "failed", str(last[FAILED_KEY])
    elif state == "failed":
        reason = _failure_reason(failures, trial.trial_id, result)
    elif state == "complete" and (trial.trial_id in pruned or _stopped_early(trial.config, last, spec)):
        state = "pruned"
    budget = last.get("max_train_steps") or _spec_budget(trial.config, spec)
    return TrialRow(
        trial_id=trial.trial_id,
        params=dict(trial.config or {}),
        objective=scored[0][1][spec.primary.metric] if scored else None,
        state=state,
        steps=last.get("step"),
        wall_s=last.get("time_total_s"),
        reason=reason,
        budget=int(budget) if budget else None,
        values={o.metric: scored[0][1].get(o.metric) for o in spec.objectives} if scored else {},
        metrics={k: v for k, v in scored[0][1].items() if _number(v)} if scored else {},
        startup_s=last.get("startup_s"),
    )


class ColumnError(ValueError):
    """A `--columns` list naming something that is not a column; the message lists the valid ones."""


def parse_columns(text: str) -> list[str]:
    """`--columns clip_score,cmmd,val_loss`: the metric columns of the trials table, in that order."""
    names = list(dict.fromkeys(c.strip() for c in text.split(",") if c.strip()))
    unknown = [c for c in names if c not in TABLE_COLUMNS]
    if unknown or not names:
        what = f"unknown column(s) {', '.join(unknown)}" if unknown else "no column given"
        raise ColumnError(f"--columns: {what}; valid columns: {', '.join(TABLE_COLUMNS)} "
                          "(trial, params, the objective, state, steps, wall time and the bill are always shown)")
    return names


def _pruned_trials(spec: SweepSpec, experiment: str) -> set[str]:
    """Trial ids that the pruning scheduler stopped, from its record when sweeps.pruning keeps one."""
    from sweeps.study_storage import load_pruned, study_uri

    return set(load_pruned(study_uri(spec)))


def _stopped_early(params: dict, last: dict, spec: SweepSpec) -> bool:
    """A trial that ended normally before its step budget was stopped by the scheduler."""
    if last.get("step") is None:
        return False
    budget = last.get("max_train_steps") or _spec_budget(params, spec)  # stub trainables: the spec's
    if budget is None:  # an invalid config never trained; it is failed, not pruned
        return False
    return int(last["step"]) < budget


def _spec_budget(params: dict | None, spec: SweepSpec) -> int | None:
    try:
        return spec.train_config(params or {}).max_train_steps
    except Exception:  # an invalid config
        return None


def _failure_reason(failures: str, trial_id: str, result: tune.Result) -> str:
    record = storage.join(failures, f"{trial_id}.json")
    if storage.exists(record):
        return json.loads(storage.read_text(record))["reason"]
    lines = [ln for ln in str(result.error or "").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "unknown error"


def scored_checkpoints(result: tune.Result, spec: SweepSpec) -> list[tuple[tune.Checkpoint, dict]]:
    """The trial's kept checkpoints with finite objective values, best (by the primary objective) first."""
    metric, sign = spec.primary.metric, (-1 if spec.primary.mode == "max" else 1)
    pairs = [
        (ckpt, m) for ckpt, m in (result.best_checkpoints or [])
        if all(_finite(m.get(o.metric)) for o in spec.objectives)
    ]
    return sorted(pairs, key=lambda p: sign * float(p[1][metric]))


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def format_table(rows: list[TrialRow], spec: SweepSpec, columns: list[str] | None = None) -> str:
    """One line per trial: id, params, the primary objective, metric columns, state, steps, wall time
    and, where trials report it, start-up time (what a trial spent before its first step).

    columns: the metric columns (`parse_columns`), shown even where no trial reports them ("-");
    default: the SHOWN_METRICS that some trial reports.
    """
    keys = sorted({k for r in rows for k in r.params})
    metric = spec.primary.metric
    if columns is None:
        columns = [m for m in SHOWN_METRICS if any(m in r.metrics for r in rows)]
    extra = [m for m in columns if m != metric]
    bill = sweep_bill(rows, spec)
    startup = any(r.startup_s is not None for r in rows)
    header = ["trial", *keys, metric, *extra, "state", "steps", "wall s", f"{bill.unit} h", "not run",
              *(["start s"] if startup else [])]
    body = [
        [r.trial_id, *[_fmt(r.params.get(k)) for k in keys], _fmt(r.objective), *[_fmt(r.metrics.get(m)) for m in extra],
         r.state, _fmt(r.steps), _fmt(r.wall_s), _fmt(t.trial_hours), _fmt(t.steps_not_run or None),
         *([_fmt(r.startup_s)] if startup else [])]
        for r, t in zip(rows, bill.trials)
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    failed = [f"  {r.trial_id}: {r.reason}" for r in rows if r.state == "failed"]
    counts = {s: sum(r.state == s for r in rows) for s in ("complete", "pruned", "failed", "running", "pending")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return "\n".join([*lines, "", f"{len(rows)} trials: {summary}", *(["failed trials:", *failed] if failed else []),
                      *format_bill(bill)])


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
