"""Resumable samplers: shuffled epochs of examples, and batches drawn within one aspect-ratio bucket.

A batch holds images of one bucket only, so its latents stack. Both samplers restore exactly
from their state, so a resumed run draws the same data as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from trainer.dataset_layouts import DatasetError, Example
from trainer.images import Size


def bucket_ids(examples: list[Example], target_sizes: dict[Path, Size]) -> list[int]:
    """Each example's bucket: the index of its target size among the sorted distinct sizes."""
    sizes = sorted(set(target_sizes.values()))
    return [sizes.index(target_sizes[e.image_path]) for e in examples]


class EpochSampler:
    """Shuffled epochs over the examples, resumable exactly from its state."""

    def __init__(self, num_examples: int, seed: int):
        self.num_examples = num_examples
        self.seed = seed
        self.epoch = 0
        self.position = 0

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.num_examples, generator=g).tolist()

    def next_indices(self, count: int) -> list[int]:
        out = []
        order = self._order()
        while len(out) < count:
            if self.position >= self.num_examples:
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order()
            out.append(order[self.position])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_examples": self.num_examples}

    def load_state_dict(self, state: dict) -> None:
        if state["num_examples"] != self.num_examples:
            raise DatasetError(
                f"checkpoint was taken on a dataset of {state['num_examples']} examples, this one has {self.num_examples}"
            )
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]


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
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]
