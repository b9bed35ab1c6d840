"""A sweep's prior-preservation class images: made once, before any trial starts, where a GPU is.

A cluster's driver is often a CPU-only head, where 100 class images at 50 sampling steps would
take hours. When the sweep's trials use GPUs, or the cluster has any, one Ray task holding a GPU
renders the images and returns them as PNG bytes, and the driver writes them into the folder that
the plan gives every trial (`TrialPlan.fixed["class_data_dir"]`). Without GPUs (a CPU-only sweep
on this machine) they are made in-process. Trials never make class images: the plan's prepared
data already lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ray

from common.files import file_lock
from sweeps.ray_session import ensure_ray
from sweeps.spec_schema import SweepSpec
from trainer.class_images import LOCK_FILE, missing_class_images, next_class_indices, write_class_images
from trainer.config import TrainConfig
from trainer.preparation import class_images_from_base_model


@dataclass(frozen=True)
class ClassImagesMade:
    count: int  # images written (0: the folder held enough)
    node_id: str | None = None  # the Ray node whose GPU rendered them; None: in-process


def gpu_worker_wanted(spec: SweepSpec, address: str | None) -> bool:
    """Whether the class images go to a GPU worker: the trials use GPUs, or the cluster at
    `address` has some (connecting to it). A local CPU-only sweep starts no Ray for this."""
    if spec.resources.gpus_per_trial <= 0 and not address:
        return False
    ensure_ray(address)
    # GPU trials imply GPU nodes, even when an autoscaler has not started one yet.
    return spec.resources.gpus_per_trial > 0 or ray.cluster_resources().get("GPU", 0) >= 1


def ensure_sweep_class_images(cfg: TrainConfig, folder: str | Path, gpu_worker: bool) -> ClassImagesMade:
    """Make the class images that `folder` lacks (cfg.num_class_images wanted) with cfg's base
    model and `class_sampling`, and write them there: the one call a sweep's driver makes, with
    the folder every trial reads. `gpu_worker`: render in a Ray task with num_gpus=1."""
    folder = Path(folder)
    if not missing_class_images(cfg, folder):
        return ClassImagesMade(0)
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / LOCK_FILE):  # another sweep on the same folder waits, then finds them
        indices = next_class_indices(cfg, folder)
        if not indices:
            return ClassImagesMade(0)
        print(f"class images: {len(indices)} of {cfg.num_class_images} missing in {folder}; generating them "
              f"({cfg.class_sampling.steps} {cfg.class_sampling.sampler} steps, guidance {cfg.class_sampling.guidance_scale}) "
              f"{'on a GPU worker' if gpu_worker else 'in-process'}", flush=True)
        if gpu_worker:
            task = ray.remote(num_gpus=1, num_cpus=1)(_render_on_worker)
            node_id, pngs = ray.get(task.remote(cfg, indices))
        else:
            node_id, pngs = None, class_images_from_base_model(cfg, indices)
        write_class_images(folder, pngs)
    print(f"class images: {len(indices)} written into {folder}"
          + (f" (rendered on GPU worker node {node_id})" if node_id else ""), flush=True)
    return ClassImagesMade(len(indices), node_id)


def _render_on_worker(cfg: TrainConfig, indices: list[int]) -> tuple[str, list[tuple[str, bytes]]]:
    return ray.get_runtime_context().get_node_id(), class_images_from_base_model(cfg, indices)
