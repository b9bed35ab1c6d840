"""Orchestration overhead: many trials of a stub trainable over 64 logical GPUs on local Ray.

    python bench/orchestration.py --mode lorasweep --trials 500     # sweeps.tuner.build_tuner + our searcher/pruner
    python bench/orchestration.py --mode plain --trials 500         # plain Ray Tune + OptunaSearch, same stub

The stub does no work (it reports `--reports` results, sleeping `--sleep` s between them), so
the wall time is the orchestration: trial actor start/stop, searcher (Optuna ask/tell, journal
file), scheduler (pruner), result handling and Tune's bookkeeping. Prints one JSON line:

- trials_per_min: trials finished (complete or pruned) per minute of `Tuner.fit()` wall time;
- wall_s_per_trial: fit wall / trials;
- slot_s_per_trial: fit wall x concurrency / trials: how long each of the 64 GPU slots is held
  per trial beyond the trial's own work (the stub's sleeps are subtracted): a GPU idles this long;
- driver_cpu_ms_per_trial: the driver process's CPU time (user + sys) per trial: the cost of
  searcher, scheduler and Tune bookkeeping, which does not depend on worker start-up;
- driver_peak_rss_mb: the driver's peak resident memory, sampled every 0.2 s with psutil
  (driver_rss_before_fit_mb: the same before fit(), i.e. imports and Tuner construction).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def stub_trainable(config: dict) -> None:
    """Known curves: good learning rates (near 3e-3) rise faster; a few reports, no real work."""
    from ray import tune

    quality = 1.0 - abs(math.log10(config["learning_rate"]) + 2.5) / 2.0 + 0.01 * config.get("rank", 4)
    reports, sleep = config.get("_reports", 3), config.get("_sleep", 0.0)
    for i in range(1, reports + 1):
        if sleep:
            time.sleep(sleep)
        tune.report({"step": 10 * i, "clip_score": quality * (1 - math.exp(-i / 2)), "loss": 1.0 / i})


class PeakRss:
    """Samples the driver's RSS in a thread."""

    def __init__(self, period_s: float = 0.2):
        self.proc, self.period, self.peak = psutil.Process(), period_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def bench_spec(args, storage: str):
    from sweeps.spec import parse_spec

    return parse_spec({
        "name": "orchestration-bench", "storage": storage, "base_model": "builtin:tiny-sd", "dataset": "builtin:demo",
        "train": {"max_train_steps": 10 * args.reports},
        "space": {"learning_rate": {"type": "loguniform", "low": 1e-5, "high": 1e-1},
                  "rank": {"type": "choice", "values": [2, 4, 8, 16]}},
        "eval": {"interval": 10, "prompts": ["{trigger} a red circle"]},
        "objective": {"metric": "clip_score", "mode": "max"},
        "search": {"sampler": "tpe", "num_trials": args.trials, "max_concurrent": args.concurrency, "seed": 0},
        "pruner": {"type": args.pruner, "options": {"n_startup_trials": 5} if args.pruner == "median" else {}},
        "resources": {"cpus_per_trial": args.cpus_per_trial, "gpus_per_trial": 1},
    }, "bench")


def lorasweep_tuner(args, storage: str):
    """The real sweep's code path: spec -> sweeps.tuner.build_tuner with the stub as trainable."""
    from ray import tune

    from sweeps.tuner import build_tuner

    spec = bench_spec(args, storage)
    stub = tune.with_parameters(_with_knobs, reports=args.reports, sleep=args.sleep)
    return build_tuner(spec, None, trainable=stub), spec


def _with_knobs(config: dict, reports: int, sleep: float) -> None:
    stub_trainable({**config, "_reports": reports, "_sleep": sleep})


def plain_tuner(args, storage: str):
    """What a user would write with Ray Tune + OptunaSearch alone (no pruning: Optuna's pruner
    does not act through OptunaSearch)."""
    import optuna
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    space = {"learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True),
             "rank": optuna.distributions.CategoricalDistribution([2, 4, 8, 16])}
    searcher = OptunaSearch(space=space, metric="clip_score", mode="max",
                            sampler=optuna.samplers.TPESampler(seed=0, multivariate=True, constant_liar=True))
    trainable = tune.with_resources(tune.with_parameters(_with_knobs, reports=args.reports, sleep=args.sleep),
                                    {"cpu": args.cpus_per_trial, "gpu": 1})
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, args.concurrency),
                                    num_samples=args.trials, metric="clip_score", mode="max", reuse_actors=False),
        run_config=tune.RunConfig(name="tune", storage_path=storage, verbose=0),
    ), None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["lorasweep", "plain"], required=True)
    p.add_argument("--trials", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--gpus", type=int, default=64, help="logical GPUs declared to local Ray")
    p.add_argument("--cpus-per-trial", type=float, default=0.01, help="logical CPUs per trial (GPUs bound concurrency)")
    p.add_argument("--reports", type=int, default=3)
    p.add_argument("--sleep", type=float, default=0.0, help="seconds of 'work' before each report")
    p.add_argument("--pruner", default="median", choices=["median", "none", "asha"])
    args = p.parse_args(argv)

    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # address="local": a fresh local cluster even when another one runs on this machine.
    ray.init(address="local", num_cpus=max(2, math.ceil(args.concurrency * args.cpus_per_trial)), num_gpus=args.gpus,
             include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        tuner, spec = (lorasweep_tuner if args.mode == "lorasweep" else plain_tuner)(args, tmp)
        rss0 = psutil.Process().memory_info().rss  # after imports and Tuner construction
        cpu0 = psutil.Process().cpu_times()
        with PeakRss() as rss:
            t0 = time.perf_counter()
            grid = tuner.fit()
            wall = time.perf_counter() - t0
        cpu1 = psutil.Process().cpu_times()
        done = sum(1 for r in grid if r.error is None)
        pruned = 0
        if spec is not None:
            from sweeps.search import load_pruned

            pruned = len(load_pruned(Path(spec.output_dir) / "study"))
    ray.shutdown()
    work = args.reports * args.sleep
    out = {
        "mode": args.mode, "pruner": args.pruner if args.mode == "lorasweep" else "none", "trials": args.trials,
        "finished": done, "pruned": pruned, "concurrency": args.concurrency, "reports": args.reports,
        "sleep_s": args.sleep, "wall_s": round(wall, 1), "trials_per_min": round(args.trials / wall * 60, 1),
        "wall_s_per_trial": round(wall / args.trials, 3),
        "slot_s_per_trial": round(wall * args.concurrency / args.trials - work, 2),
        "driver_cpu_ms_per_trial": round(((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / args.trials * 1000, 1),
        "driver_peak_rss_mb": round(rss.peak / 2**20),
        "driver_rss_before_fit_mb": round(rss0 / 2**20),
    }
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
