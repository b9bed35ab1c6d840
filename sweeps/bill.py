"""What a sweep cost and what pruning saved, from its trials' measured wall times and steps.

Per trial: trial-hours = wall time x the GPUs it held (its CPUs when trials hold no GPU), the
steps it ran and, when pruned, the steps of its budget it did not run. Per sweep: the totals, the
measured seconds per step (all trials' wall time over all their steps: evaluations, checkpoints and
start-up included, as a pruned trial would have spent them) and what pruning saved = steps not
run x that figure x the trial's GPUs (or CPUs). Failed trials cost what they ran and save nothing.
Pure: rows in (sweeps.results.TrialRow), numbers out; `sweeps.dry_run.estimate_vs_measured`
sets the figures beside the dry run's estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

from sweeps.spec_schema import SweepSpec


@dataclass(frozen=True)
class TrialBill:
    trial_id: str
    state: str
    wall_s: float
    units: float  # GPUs (or CPUs) the trial held
    steps_run: int
    steps_not_run: int  # of its step budget, when the scheduler pruned it; else 0

    @property
    def trial_hours(self) -> float:
        return self.wall_s * self.units / 3600


@dataclass(frozen=True)
class SweepBill:
    unit: str  # "GPU" or "CPU"
    units_per_trial: float
    trials: list[TrialBill]

    def _total(self, name: str) -> float:
        return sum(getattr(t, name) for t in self.trials)

    @property
    def trial_hours(self) -> float:
        return self._total("trial_hours")

    @property
    def wall_s(self) -> float:
        return self._total("wall_s")

    @property
    def steps_run(self) -> int:
        return self._total("steps_run")

    @property
    def steps_not_run(self) -> int:
        return self._total("steps_not_run")

    @property
    def s_per_step(self) -> float | None:
        """Measured: every trial's wall time over every step run (None before a step ran)."""
        return self.wall_s / self.steps_run if self.steps_run else None

    def saved_hours_of(self, trial: TrialBill) -> float:
        return trial.steps_not_run * (self.s_per_step or 0.0) * trial.units / 3600

    @property
    def saved_hours(self) -> float:
        """What pruning saved: the steps not run at the measured seconds per step, in trial-hours."""
        return sum(self.saved_hours_of(t) for t in self.trials)

    def of(self, trial_id: str) -> TrialBill | None:
        return next((t for t in self.trials if t.trial_id == trial_id), None)

    def as_dict(self) -> dict:
        """The totals, for best.json and W&B (numbers only, hours rounded to the second)."""
        return {
            "unit": self.unit, "units_per_trial": self.units_per_trial, "trials": len(self.trials),
            "trial_hours": round(self.trial_hours, 6), "wall_s": round(self.wall_s, 3),
            "steps_run": self.steps_run, "steps_not_run": self.steps_not_run,
            "s_per_step": None if self.s_per_step is None else round(self.s_per_step, 4),
            "pruning_saved_hours": round(self.saved_hours, 6),
            "pruned_trials": sum(t.steps_not_run > 0 for t in self.trials),
        }


def billing_unit(spec: SweepSpec) -> tuple[str, float]:
    """("GPU", GPUs per trial), or ("CPU", CPUs per trial) when trials hold no GPU."""
    r = spec.resources
    return ("GPU", r.gpus_per_trial) if r.gpus_per_trial > 0 else ("CPU", r.cpus_per_trial)


def sweep_bill(rows: list, spec: SweepSpec) -> SweepBill:
    """The bill of the trials table's rows (each with trial_id, state, wall_s, steps, budget)."""
    unit, units = billing_unit(spec)
    trials = []
    for r in rows:
        steps = int(r.steps or 0)
        not_run = max(0, int(r.budget) - steps) if r.state == "pruned" and r.budget else 0
        trials.append(TrialBill(r.trial_id, r.state, float(r.wall_s or 0.0), units, steps, not_run))
    return SweepBill(unit, units, trials)


def format_bill(bill: SweepBill) -> list[str]:
    """The bill's lines under the trials table."""
    u = f"{bill.unit}-hours"
    rate = f" at {bill.s_per_step:.3g} s per step measured" if bill.s_per_step else ""
    lines = [f"bill: {bill.trial_hours:.4g} {u} ({len(bill.trials)} trials, wall x {bill.units_per_trial:g} "
             f"{bill.unit} each), {bill.steps_run} steps run{rate}"]
    pruned = [t for t in bill.trials if t.steps_not_run]
    if pruned:
        whole = bill.trial_hours + bill.saved_hours
        share = f" ({bill.saved_hours / whole:.0%} of what the sweep would have cost unpruned)" if whole else ""
        lines.append(f"pruning: {len(pruned)} trial(s) stopped early, {bill.steps_not_run} steps not run = "
                     f"{bill.saved_hours:.4g} {u} saved{share}")
    else:
        lines.append("pruning: no trial was stopped early (nothing saved)")
    return lines
