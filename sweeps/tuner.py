"""Builds and runs the Ray Tune sweep: OptunaSearch over the spec's space, one trainable per trial."""

from __future__ import annotations

import os
from pathlib import Path

import optuna
import ray
from ray import tune
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from sweeps.progress import ProgressPrinter
from sweeps.spec import ParamSpace, SweepSpec
from sweeps.trainable import train_trial


def optuna_distribution(param: ParamSpace) -> optuna.distributions.BaseDistribution:
    if param.type == "loguniform":
        return optuna.distributions.FloatDistribution(param.low, param.high, log=True)
    if param.type == "uniform":
        return optuna.distributions.FloatDistribution(param.low, param.high)
    if param.type == "int":
        return optuna.distributions.IntDistribution(int(param.low), int(param.high), log=param.log)
    return optuna.distributions.CategoricalDistribution(param.values)


def make_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    if spec.search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.search.seed)
    # Multivariate TPE with constant liar: parallel trials do not all pick the same config.
    return optuna.samplers.TPESampler(seed=spec.search.seed, multivariate=True, constant_liar=True)


def make_searcher(spec: SweepSpec) -> ConcurrencyLimiter:
    space = {name: optuna_distribution(p) for name, p in spec.searched().items()}
    searcher = OptunaSearch(
        space=space,
        metric=spec.primary.metric,
        mode=spec.primary.mode,
        sampler=make_sampler(spec),
    )
    return ConcurrencyLimiter(searcher, max_concurrent=spec.search.max_concurrent)


def ensure_ray(address: str | None, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Connect to a cluster at `address`, or start local Ray when none is given."""
    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in ("LORASWEEP_CACHE", "HF_HUB_OFFLINE", "WANDB_MODE") if k in os.environ}
    kwargs = {"runtime_env": {"env_vars": env}} if env else {}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, **kwargs)


def build_tuner(spec: SweepSpec) -> tune.Tuner:
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, spec_data=spec.model_dump()),
        {"cpu": spec.resources.cpus_per_trial, "gpu": spec.resources.gpus_per_trial},
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(spec),
            num_samples=spec.search.num_trials,
            metric=spec.primary.metric,
            mode=spec.primary.mode,
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=f"{spec.storage_uri}/{spec.name}",
            callbacks=[ProgressPrinter(spec.primary.metric)],
            verbose=0,
        ),
    )


def run_sweep(spec: SweepSpec, address: str | None = None) -> tune.ResultGrid:
    Path(spec.output_dir).mkdir(parents=True, exist_ok=True)
    ensure_ray(address)
    return build_tuner(spec).fit()
