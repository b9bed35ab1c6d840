"""A sweep replayed on a table of learning curves, one trial at a time, without Ray or training.

The sweep's own searcher (sweeps.search.make_search_alg: Optuna's sampler and study, the spec's
pruner inside it) and its own pruning scheduler (sweeps.pruning.make_scheduler) make every
decision; only the trainable is replaced by a lookup of the results a real trial of that config
reported (a tabular benchmark, as HPOBench and NAS-Bench do it). The calls are the ones Ray
Tune's controller makes for a function trainable with at most one trial running: suggest; per
result the scheduler, then (unless it said STOP) the searcher; when the function returns, Tune
hands its last result once more marked done; then complete to both.
`bench/sweep_quality.py real` checks that a real sweep on Ray Tune with real training proposes
the same trials and prunes them at the same steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from sweeps.pruning import make_pruner, make_scheduler
from sweeps.spec_schema import SweepSpec

Lookup = Callable[[dict], list[dict]]  # config -> the results its trial reports, in order


@dataclass
class ReplayedTrial:
    number: int
    config: dict
    results: list[dict] = field(default_factory=list)  # what it reported before it ended
    stopped: bool = False  # the scheduler stopped it before its last result

    @property
    def last_step(self) -> int:
        return int(self.results[-1]["step"])


def replay(spec: SweepSpec, lookup: Lookup, study_dir: Path, keep_going: Callable[[list[ReplayedTrial]], bool]
           ) -> list[ReplayedTrial]:
    """Run the spec's search and pruning on `lookup`, one trial at a time, while `keep_going(done)`
    (e.g. a compute budget) and the spec's num_trials allow; returns the trials in order."""
    if spec.search.max_concurrent != 1:
        raise ValueError("replay runs one trial at a time: set search.max_concurrent: 1 (then the order is fixed)")
    from sweeps.search import make_search_alg  # Ray Tune's OptunaSearch: imported with Ray

    alg = make_search_alg(spec, study_dir, pruner=make_pruner(spec))
    controller = SimpleNamespace(search_alg=alg)  # what Tune hands a scheduler
    sched = make_scheduler(spec)
    done: list[ReplayedTrial] = []
    while len(done) < spec.search.num_trials and keep_going(done):
        tid = f"r{len(done):05d}"
        config = alg.suggest(tid)
        if config is None:  # a finished grid
            break
        trial = SimpleNamespace(trial_id=tid, config=config)
        run = ReplayedTrial(len(done), dict(config))
        if sched is not None:
            sched.on_trial_add(controller, trial)
        for i, result in enumerate(lookup(config), start=1):
            result = {**result, "training_iteration": i, "trial_id": tid}
            run.results.append(result)
            if sched is not None and sched.on_trial_result(controller, trial, result) == "STOP":
                run.stopped = True
                break
            alg.on_trial_result(tid, result)
        last = run.results[-1]
        if not run.stopped:  # the function returned: Tune processes its last result again, done
            again = {**last, "done": True}
            if sched is None or sched.on_trial_result(controller, trial, again) != "STOP":
                alg.on_trial_result(tid, again)
        if sched is not None:
            sched.on_trial_complete(controller, trial, last)
        alg.on_trial_complete(tid, last)
        done.append(run)
    return done


def pruned_at(runs: list[ReplayedTrial]) -> list[int | None]:
    """Per trial, the step at which the scheduler stopped it before its budget; None for complete."""
    out = []
    for r in runs:
        budget = r.results[-1].get("max_train_steps")
        out.append(r.last_step if r.stopped and (budget is None or r.last_step < budget) else None)
    return out
