"""A search generator's saved state that lags the saved trials (a head lost mid-upload) is brought
in line with them before a resume, and a consistent one is left as it is. End to end, on a real
sweep on s3:// storage: tests/sweeps/test_remote_resume.py."""

from ray.tune.search import ConcurrencyLimiter, SearchGenerator
from ray.tune.search.optuna import OptunaSearch

from sweeps.snapshot_repair import LIMITER, consistent_search_state


def _limited_state(live: set[str], counter: int) -> dict:
    """A real SearchGenerator(ConcurrencyLimiter(...)) state as SearchGenerator.save_to_dir saves it."""
    limiter = ConcurrencyLimiter(OptunaSearch(metric="x", mode="max"), max_concurrent=1)
    limiter.live_trials = set(live)
    limiter.num_unfinished_live_trials = len(live)
    generator = SearchGenerator(limiter)
    generator._counter = counter
    return {**generator.get_state(), LIMITER: limiter.get_state()}


def test_a_lagging_limiter_state_follows_the_saved_trials():
    stale = _limited_state({"t1"}, counter=1)  # the snapshot before trial t2 was suggested
    fixed = consistent_search_state(stale, ["t1", "t2"], unfinished={"t2"})
    assert fixed["counter"] == 2
    limiter = ConcurrencyLimiter(OptunaSearch(metric="x", mode="max"), max_concurrent=1)
    limiter.set_state(fixed[LIMITER])
    assert limiter.live_trials == {"t2"} and limiter.num_unfinished_live_trials == 1  # the ended t1 frees its slot
    assert stale[LIMITER]["live_trials"] == {"t1"}, "the state read is not changed in place"


def test_a_consistent_state_is_left_alone():
    state = _limited_state({"t2"}, counter=2)
    assert consistent_search_state(state, ["t1", "t2"], unfinished={"t2"}) == state
