"""A sweep's ground-truth evaluation (`eval.ground_truth`): the pairs resolved once by the driver, each
evaluation's images scored against the truth in the trial (evaluator.ground_truth), and the base
model's scores computed once per sweep as the reference row.

The base row is stored at `<sweep>/ground_truth/base.json`; the first trial to evaluate from step 0
writes it (a fresh LoRA, or a full fine-tune before its first step, is the base model), every later
evaluation of every trial reports it again as `base_gt_*`, so that each result row reads "original
vs fine-tuned" as the seed project's comparison did.
"""

from __future__ import annotations

import json

from sweeps import storage
from sweeps.spec_schema import GroundTruthSpec

BASE_ROW = "ground_truth/base.json"


def ground_truth_problems(gt: GroundTruthSpec) -> list[str]:
    """The folder's and the LPIPS weights' problems, as `eval.ground_truth.<key>: message`."""
    from evaluator.ground_truth import GroundTruthError, read_ground_truth
    from evaluator.lpips_judge import LpipsWeightsMissing, backbone_file

    problems = []
    try:
        read_ground_truth(gt.folder)
    except GroundTruthError as err:
        problems.append(f"eval.ground_truth.folder: {err}")
    try:
        backbone_file(gt.lpips_net, gt.lpips_weights)
    except LpipsWeightsMissing as err:
        problems.append(f"eval.ground_truth.lpips_weights: {err}")
    return problems


def plan_entry(gt: GroundTruthSpec) -> dict:
    """What a trial needs (picklable, absolute paths): captions, truth images, seed, LPIPS backbone."""
    from evaluator.ground_truth import read_ground_truth
    from evaluator.lpips_judge import backbone_file

    pairs = read_ground_truth(gt.folder)
    return {"captions": [p.caption for p in pairs], "images": [p.image_path for p in pairs], "seed": gt.seed,
            "lpips_net": gt.lpips_net, "lpips_weights": str(backbone_file(gt.lpips_net, gt.lpips_weights))}


class GroundTruthScorer:
    """`scorer(trainer)`: the gt_* metrics of the trainer's evaluation weights, with the base row (base_gt_*)."""

    def __init__(self, plan):
        from evaluator import ClipModel
        from evaluator.ground_truth import GroundTruthPair
        from evaluator.lpips_judge import load_lpips

        self.entry = plan.ground_truth
        self.pairs = [GroundTruthPair(c, p) for c, p in zip(self.entry["captions"], self.entry["images"])]
        self.clip = ClipModel.load(plan.evaluator_model, plan.evaluator_pretrained)
        self.lpips = load_lpips(self.entry["lpips_net"], self.entry["lpips_weights"])
        self.truth: dict[int, object] = {}  # per resolution
        self.base_uri = storage.join(plan.sweep_uri, BASE_ROW)

    def scores(self, trainer) -> dict:
        from evaluator.ground_truth import ground_truth_scores, load_truth_images

        resolution, captions = trainer.cfg.resolution, self.entry["captions"]
        if resolution not in self.truth:
            self.truth[resolution] = load_truth_images(self.pairs, resolution)
        images = trainer.sample(captions, [self.entry["seed"]] * len(captions))
        return ground_truth_scores(self.clip, self.lpips, images, self.truth[resolution], captions)

    def ensure_base(self, trainer) -> None:
        """Before the first step (a fresh LoRA or an untrained full fine-tune is the base model): the
        base row, once per sweep."""
        if trainer.global_step == 0 and not storage.exists(self.base_uri):
            storage.write_text(self.base_uri, json.dumps(self.scores(trainer), indent=2))

    def __call__(self, trainer) -> dict:
        base = json.loads(storage.read_text(self.base_uri)) if storage.exists(self.base_uri) else {}
        return {**self.scores(trainer), **{f"base_{k}": v for k, v in base.items()}}


def make_ground_truth_scorer(plan) -> GroundTruthScorer | None:
    return GroundTruthScorer(plan) if plan.ground_truth else None


def read_base_row(sweep_uri: str) -> dict | None:
    """The base model's ground-truth scores of a sweep, when a trial has written them."""
    uri = storage.join(sweep_uri, BASE_ROW)
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None



