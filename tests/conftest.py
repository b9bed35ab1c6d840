"""Shared fixtures: one cache of tiny models and demo data for the whole test session."""

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
