"""Samplers: every example once per epoch, batches within one bucket, exact resume."""

import pytest

from trainer.samplers import BucketBatchSampler, EpochSampler


def test_epoch_sampler_resumes_exactly():
    a = EpochSampler(7, seed=3)
    first = a.next_indices(5)
    state = a.state_dict()
    rest = a.next_indices(12)
    b = EpochSampler(7, seed=3)
    b.load_state_dict(state)
    assert b.next_indices(12) == rest
    assert sorted(first + rest[:2]) == list(range(7)), "an epoch visits every example once"


def test_bucket_sampler_batches_within_buckets_and_resumes():
    ids = [0, 1, 0, 2, 1, 0, 0, 1, 2, 0]
    s = BucketBatchSampler(ids, batch_size=2, seed=5)
    epoch = [s.next_batch() for _ in range(s.batches_per_epoch)]
    assert sorted(i for b in epoch for i in b) == list(range(10)), "an epoch visits every example once"
    assert all(len({ids[i] for i in b}) == 1 for b in epoch), "a batch never mixes buckets"
    s.next_batch()
    state = s.state_dict()
    rest = [s.next_batch() for _ in range(9)]
    t = BucketBatchSampler(ids, batch_size=2, seed=5)
    t.load_state_dict(state)
    assert [t.next_batch() for _ in range(9)] == rest
    with pytest.raises(ValueError, match="same data"):
        BucketBatchSampler(ids[:-1], 2, 5).load_state_dict(state)
