"""Aspect-ratio buckets (kohya style) and the resumable batch sampler that draws within them.

Buckets are (width, height) pairs in `step` px increments between a min and a max side whose
area is at most resolution^2; each image goes to the bucket of nearest aspect ratio (in log
space, so 2:1 and 1:2 are equally far from 1:1), is resized to cover it and cropped. A batch
holds images of one bucket only, so its latents stack.
"""

from __future__ import annotations

import math

import torch

Size = tuple[int, int]  # (width, height) in pixels


def make_buckets(resolution: int, min_reso: int, max_reso: int, step: int = 64) -> list[Size]:
    """Every (w, h) with sides multiples of `step` in [min_reso, max_reso] and w*h <= resolution^2,
    taking for each width the largest fitting height (and its transpose)."""
    area = resolution * resolution
    buckets: set[Size] = set()
    for w in range(min_reso, max_reso + 1, step):
        h = min(max_reso, (area // w) // step * step)
        if h >= min_reso:
            buckets.add((w, h))
            buckets.add((h, w))
    if not buckets:
        raise ValueError(f"no bucket fits resolution {resolution} between {min_reso} and {max_reso} px")
    return sorted(buckets)


def nearest_bucket(size: Size, buckets: list[Size]) -> Size:
    """The bucket whose aspect ratio is nearest the image's (ties: the larger area)."""
    aspect = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


class BucketBatchSampler:
    """Shuffled epochs of batches, each batch from one bucket; resumable exactly from its state.

    Per epoch (seeded by seed and epoch): the examples of each bucket are shuffled and cut into
    batches of `batch_size` (the last one of a bucket may be smaller), then the batches are shuffled.
    Without bucketing every example is in bucket 0.
    """

    def __init__(self, bucket_ids: list[int], batch_size: int, seed: int):
        if not bucket_ids:
            raise ValueError("no examples to sample from")
        self.bucket_ids = list(bucket_ids)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._batches = self._epoch_batches(0)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        by_bucket: dict[int, list[int]] = {}
        for i, b in enumerate(self.bucket_ids):
            by_bucket.setdefault(b, []).append(i)
        batches = []
        for b in sorted(by_bucket):
            members = by_bucket[b]
            order = [members[j] for j in torch.randperm(len(members), generator=g).tolist()]
            batches += [order[k : k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]

    @property
    def batches_per_epoch(self) -> int:
        return len(self._batches)

    def next_batch(self) -> list[int]:
        if self.position >= len(self._batches):
            self.epoch, self.position = self.epoch + 1, 0
            self._batches = self._epoch_batches(self.epoch)
        batch = self._batches[self.position]
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_examples": len(self.bucket_ids),
            "bucket_ids_hash": _ids_hash(self.bucket_ids),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["num_examples"] != len(self.bucket_ids) or state["bucket_ids_hash"] != _ids_hash(self.bucket_ids):
            raise ValueError(
                f"checkpoint was taken on a dataset of {state['num_examples']} examples (or other buckets); "
                f"this one has {len(self.bucket_ids)}: resume on the same data and bucket settings"
            )
        if state["batch_size"] != self.batch_size:
            raise ValueError(f"checkpoint used train_batch_size {state['batch_size']}, this run {self.batch_size}")
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]
        self._batches = self._epoch_batches(self.epoch)


def _ids_hash(ids: list[int]) -> str:
    import hashlib

    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]
