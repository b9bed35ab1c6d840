"""The driver's Ray: a cluster at an address, or a local Ray of our own."""

from __future__ import annotations

import os

import ray

from sweeps.tracking import own_wandb_services

# What every Ray worker must see as the driver does (caches, offline hub, offline W&B).
FORWARDED_ENV = ("LORASWEEP_CACHE", "HF_HUB_OFFLINE", "WANDB_MODE")


def ensure_ray(address: str | None, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Connect to a cluster at `address`, or start local Ray when none is given."""
    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    kwargs = {"runtime_env": {"env_vars": env}} if env else {}
    if address:
        ray.init(address=address, **kwargs)
    else:
        own_wandb_services()  # the local Ray's workers inherit this environment
        # "local": a new Ray of our own, never whatever cluster this machine last started (ray.init()'s default).
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, **kwargs)
