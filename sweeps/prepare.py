"""Once per sweep, before any trial: resolve built-in models and data, check the dataset.

Trials then receive concrete absolute paths, so they neither race to build the same files
nor depend on the driver's working directory.
"""

from __future__ import annotations

from pathlib import Path

from evaluator.tiny import TINY_CLIP_ID, ensure_tiny_clip
from sweeps.spec import SpecError, SweepSpec
from trainer.cache import build_caches
from trainer.data import DatasetError, resolve_dataset
from trainer.datasets import load_train_data
from trainer.model_loading import resolve_base_model
from common.cache_dir import cache_root


def _resolve_base_model(base_model: str) -> str:
    if base_model.startswith("builtin:"):
        return resolve_base_model(base_model)[1]
    local = Path(base_model).expanduser()
    return str(local.resolve()) if local.exists() else base_model


def prepare_sweep(spec: SweepSpec, source: str = "<spec>") -> SweepSpec:
    """A copy of `spec` with built-ins built and local paths made absolute; dataset problems raise SpecError."""
    dataset = resolve_dataset(spec.dataset, cache_root()).expanduser().resolve()
    prepared = spec.model_copy(update={"dataset": str(dataset)})
    try:  # every layout the trainer reads (kohya, imagefolder, dreambooth), with its own checks
        load_train_data(prepared.train_config({}))
    except DatasetError as err:
        raise SpecError(source, [f"dataset: {err}"]) from None
    if spec.evaluator.model == TINY_CLIP_ID:
        ensure_tiny_clip()
    prepared = prepared.model_copy(update={"base_model": _resolve_base_model(spec.base_model)})
    build_dataset_caches(prepared)
    return prepared


def build_dataset_caches(spec: SweepSpec) -> None:
    """Latents and text embeddings (and class images), once per sweep before the first trial."""
    from sweeps.trainable import _quiet_libraries

    _quiet_libraries()
    searched = spec.searched().get("clip_skip")
    clip_skips = [int(v) for v in searched.extremes()] if searched is not None else None
    if searched is not None and searched.type == "int":
        clip_skips = list(range(clip_skips[0], clip_skips[1] + 1))
    build_caches(spec.train_config({}), clip_skips=clip_skips)
