"""eval.ground_truth in a sweep: its inputs checked before anything trains, and a trial's scorer writing the
base model's row once and reporting it beside the trained model's scores."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision

from evaluator.lpips_judge import BACKBONE_FILES
from evaluator.tiny import TINY_CLIP_ID
from sweeps.ground_truth_scoring import BASE_ROW, GroundTruthScorer, ground_truth_problems, plan_entry
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
    plan = SimpleNamespace(ground_truth=entry, evaluator_model=TINY_CLIP_ID, evaluator_pretrained=None,
                           sweep_uri=str(tmp_path / "sweep"))
    trainer = LoraTrainer.build(build_train_config(dict(
        base_model=str(tiny_sd_dir), dataset=str(demo_dataset), resolution=64, method="full", learning_rate=1e-3,
        train_batch_size=2, max_train_steps=2, sampling={"steps": 4})), device="cpu")
    scorer = GroundTruthScorer(plan)
    scorer.ensure_base(trainer)
    base = json.loads((tmp_path / "sweep" / BASE_ROW).read_text())
    at_start = scorer(trainer)
    assert at_start["base_gt_lpips"] == pytest.approx(at_start["gt_lpips"]) == pytest.approx(base["gt_lpips"])
    trainer.train(2)
    scorer.ensure_base(trainer)  # not rewritten by a trained model
    assert json.loads((tmp_path / "sweep" / BASE_ROW).read_text()) == base
    trained = scorer(trainer)
    assert trained["base_gt_lpips_items"] == base["gt_lpips_items"] and len(trained["gt_lpips_items"]) == 4
    assert not np.allclose(trained["gt_lpips_items"], base["gt_lpips_items"])
