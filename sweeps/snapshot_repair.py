"""A killed sweep's saved Tune state made consistent again before it is resumed.

Tune saves an experiment as several files in its staging folder (the trials' state
`experiment_state-*.json`, the search generator's state `search_gen_state-*.json` holding the
ConcurrencyLimiter's, the searcher's `searcher-state-*.pkl`, each trial's result files) and uploads
them to the sweep's storage together, in parallel and in no order. A head lost during an upload
leaves a mix: the trials' state of one snapshot beside the search generator's state of the one
before. Seen with `s3://` storage: trials' state knows trial 2 (running, checkpointed), the search
generator's counts one trial suggested and its limiter still holds the ended trial 1 as live. The
resumed Tune then runs trial 2, but the limiter never lets the searcher hear of its end and never
frees its one slot: the sweep waits for ever.

The trials' state is what Tune resumes (exactly its trials, nothing else), so it is the truth: the
search generator's count of suggested trials becomes the number of trials it holds, and the
limiter's live trials its unfinished ones.
"""

from __future__ import annotations

from ray import cloudpickle
from ray.tune import ExperimentAnalysis

from sweeps import storage

SEARCH_GEN_STATE = "search_gen_state-"  # ray.tune.search.SearchGenerator.CKPT_FILE_TMPL's prefix
LIMITER = "name:ConcurrencyLimiter"  # the limiter's part of that state
ENDED = ("TERMINATED", "ERROR")


def consistent_search_state(state: dict, trial_ids: list[str], unfinished: set[str]) -> dict:
    """`state` (a SearchGenerator's saved state) agreeing with the trials Tune will resume."""
    fixed = {**state, "counter": len(trial_ids)}
    if LIMITER in state:
        fixed[LIMITER] = {**state[LIMITER], "live_trials": set(unfinished), "num_unfinished_live_trials": len(unfinished)}
    return fixed


def repair_search_state(experiment: str) -> list[str]:
    """Rewrite in the experiment folder (local or URI) each search generator state that disagrees
    with the saved trials; returns one line per change, for the console."""
    trials = ExperimentAnalysis(experiment).trials
    ids = [t.trial_id for t in trials]
    unfinished = {t.trial_id for t in trials if t.status not in ENDED}
    changes = []
    for name in storage.listdir(experiment):
        if not name.startswith(SEARCH_GEN_STATE):
            continue
        path = storage.join(experiment, name)
        state = cloudpickle.loads(storage.read_bytes(path))
        fixed = consistent_search_state(state, ids, unfinished)
        if fixed != state:
            storage.write_bytes(path, cloudpickle.dumps(fixed))
            live = sorted(state.get(LIMITER, {}).get("live_trials", ()))
            changes.append(f"{name}: {state['counter']} trial(s) suggested and live {live} -> {len(ids)} and "
                           f"live {sorted(unfinished)}, as the saved trials say")
    return changes
