"""eval.ground_truth in a sweep: its inputs checked before anything trains, a trial's scorer writing the
base model's row (and the images of the report's panel) once and reporting it beside the trained
model's scores, and the shared evaluator giving the CLIP part the in-process numbers."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision

from evaluator.lpips_judge import BACKBONE_FILES
from evaluator.tiny import TINY_CLIP_ID
from sweeps.ground_truth_scoring import (
    BASE_ROW,
    GroundTruthScorer,
    ground_truth_problems,
    images_uri,
    local_clip_part,
    plan_entry,
    read_images,
    remote_clip_part,
    step_name,
)
from sweeps.spec_schema import GroundTruthSpec
from tests.evaluator.test_ground_truth import write_pairs
from toyworld.world import render_shapes
from trainer.config import build_train_config
from trainer.loop import LoraTrainer


def test_missing_folder_and_weights_are_both_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    problems = ground_truth_problems(GroundTruthSpec(folder=str(tmp_path / "none")))
    assert [p.split(":")[0] for p in problems] == ["eval.ground_truth.folder", "eval.ground_truth.lpips_weights"]
    assert "metadata.jsonl does not exist" in problems[0] and BACKBONE_FILES["alex"] in problems[1]


@pytest.mark.slow
def test_scorer_writes_the_base_row_once_and_reports_it(tmp_path, tiny_sd_dir, demo_dataset):
    images, captions = render_shapes(4, seed=5)
    folder = write_pairs(tmp_path / "gt", images, captions)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), tmp_path / BACKBONE_FILES["alex"])
    entry = plan_entry(GroundTruthSpec(folder=str(folder), lpips_weights=str(tmp_path / BACKBONE_FILES["alex"])))
    sweep = str(tmp_path / "sweep")
    plan = SimpleNamespace(ground_truth=entry, evaluator_model=TINY_CLIP_ID, evaluator_pretrained=None,
                           sweep_uri=sweep, evaluator_actor=None)
    trainer = LoraTrainer.build(build_train_config(dict(
        base_model=str(tiny_sd_dir), dataset=str(demo_dataset), resolution=64, method="full", learning_rate=1e-3,
        train_batch_size=2, max_train_steps=2, sampling={"steps": 4})), device="cpu")
    scorer = GroundTruthScorer(plan, "t1")
    scorer.ensure_base(trainer)
    base = json.loads((tmp_path / "sweep" / BASE_ROW).read_text())
    assert base["captions"] == captions and base["seed"] == 0
    assert np.abs(read_images(images_uri(sweep, "truth"), 4).astype(int) - images).mean() < 8  # JPEG: near, not exact
    base_images = read_images(images_uri(sweep, "base"), 4)
    at_start = scorer(trainer)
    assert at_start["base_gt_lpips"] == pytest.approx(at_start["gt_lpips"]) == pytest.approx(base["scores"]["gt_lpips"])
    assert np.array_equal(read_images(images_uri(sweep, step_name("t1", 0)), 4), base_images)
    trainer.train(2)
    scorer.ensure_base(trainer)  # not rewritten by a trained model
    assert json.loads((tmp_path / "sweep" / BASE_ROW).read_text()) == base
    trained = scorer(trainer)
    assert trained["base_gt_lpips_items"] == base["scores"]["gt_lpips_items"] and len(trained["gt_lpips_items"]) == 4
    assert not np.allclose(trained["gt_lpips_items"], base["scores"]["gt_lpips_items"])
    assert not np.array_equal(read_images(images_uri(sweep, step_name("t1", 2)), 4), base_images)


@pytest.mark.slow  # starts Ray and an evaluator replica
def test_the_shared_evaluator_gives_the_in_process_ground_truth_scores(ray_local):
    """What a trial of a sweep with a shared evaluator reports (remote_clip_part) equals what a trial
    without one computes with its own CLIP (local_clip_part), on the same images; the truth is put
    into the evaluator once and put again after the evaluator lost it."""
    from evaluator.remote import evaluator_stats, start_evaluator, stop_evaluator, stop_replica
    from sweeps.evaluator_placement import connect_replica

    name = "test-gt-evaluator"
    truth, captions = render_shapes(6, seed=2)
    generated, _ = render_shapes(6, seed=7)
    start_evaluator(name, TINY_CLIP_ID, None, num_cpus=0.5)
    try:
        plan = SimpleNamespace(evaluator_actor=name, evaluator_local_wait_s=5.0, sweep="gt-sweep",
                               evaluator_model=TINY_CLIP_ID, evaluator_pretrained=None)
        local = local_clip_part(plan)(generated, truth, captions)
        remote_part = remote_clip_part(plan)
        served = [remote_part(generated, truth, captions) for _ in range(2)]
        assert set(served[0]) == {"gt_fd", "gt_kid", "gt_cmmd", "gt_clip_t"} and served[0] == served[1]
        for key, value in local.items():
            assert served[0][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
        stats = evaluator_stats(connect_replica(name, 5.0))
        assert stats["ground_truth_calls"] == 2 and stats["reference_misses"] == 1
        for replica in stats["references"]:
            assert replica.startswith("gt-sweep/ground_truth/")
        stop_replica(next(iter(_replicas(name))))  # the evaluator is gone: a new one starts empty
        start_evaluator(name, TINY_CLIP_ID, None, num_cpus=0.5)
        again = remote_clip_part(plan)(generated, truth, captions)
        assert again == pytest.approx(served[0], rel=1e-6)
    finally:
        stop_evaluator(name)


def _replicas(name: str) -> list[str]:
    from evaluator.remote import replica_nodes

    return list(replica_nodes(name).values())
