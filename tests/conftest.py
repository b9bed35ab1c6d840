"""Shared fixtures: one cache of tiny models and demo data, and one Ray, for the whole test session."""

import os
from pathlib import Path

import pytest
import torch

# Keep the tests off the user's cache and make every test process (Ray workers included) share one.
_CACHE = Path(os.environ.setdefault("LORASWEEP_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "lorasweep-tests")))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
torch.set_num_threads(2)

# Ray for the tests, started only when a test asks for it: one plain local Ray for the whole
# session (ray_local), or a multi-node ray.cluster_utils.Cluster for one test (ray_cluster).
# Tests never call ray.init/ray.shutdown themselves.
# 4 CPUs and 2 logical GPUs (declared, none need exist: Ray schedules on them, nothing runs on
# CUDA) serve every module: each test's own limits (max_concurrent, per-trial GPUs) set its
# concurrency, never the CPU count.
RAY_LOCAL = {"num_cpus": 4, "num_gpus": 2}


def _start_local_ray() -> None:
    import ray

    # address="local": a new Ray of our own, never a cluster this machine started earlier.
    ray.init(address="local", include_dashboard=False, log_to_driver=False, **RAY_LOCAL)


@pytest.fixture(scope="session")
def ray_local():
    """The session's local Ray (RAY_LOCAL resources), shut down at the end of the session."""
    import ray

    if not ray.is_initialized():
        _start_local_ray()
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_cluster():
    """Factory: ray_cluster(head_node_args, *worker_node_args) starts a Cluster of real raylets on
    this machine, connects to it and returns it; torn down after the test. The session's local
    Ray, when running, is shut down first and started again afterwards for the tests that use it."""
    import ray
    from ray.cluster_utils import Cluster

    restore = ray.is_initialized()
    clusters = []

    def start(head_node_args: dict, *node_args: dict) -> Cluster:
        assert not clusters, "one Cluster per test"
        if ray.is_initialized():
            ray.shutdown()
        cluster = Cluster(initialize_head=True, head_node_args=head_node_args)
        clusters.append(cluster)
        for args in node_args:
            cluster.add_node(**args)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        return cluster

    yield start
    ray.shutdown()
    for cluster in clusters:
        cluster.shutdown()
    if restore:
        _start_local_ray()


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return _CACHE


@pytest.fixture(scope="session")
def tiny_sd_dir() -> Path:
    from trainer.tiny import ensure_tiny_sd

    return ensure_tiny_sd()


@pytest.fixture(scope="session")
def demo_dataset(cache_dir) -> Path:
    from trainer.train_data import DEMO_DATASET_ID, resolve_dataset

    return resolve_dataset(DEMO_DATASET_ID, cache_dir)
