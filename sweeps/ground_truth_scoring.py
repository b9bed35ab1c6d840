"""A sweep's ground-truth evaluation (`eval.ground_truth`): the pairs resolved once by the driver, each
evaluation's images scored against the truth, and the base model's scores computed once per sweep as
the reference row.

FD, KID, CMMD and CLIP-T are computed on the shared evaluator's CLIP features when the sweep runs
one (the suite's scores are), so that every trial is judged by one model, loaded once; a trial
without one uses its own CLIP (evaluator.ground_truth gives both the same numbers). LPIPS stays in
the trial: it compares pixels pair by pair with a backbone of its own (AlexNet, 10 MB, a few ms per
64 px pair on a CPU) that shares nothing with CLIP, and moving it would make every evaluator
replica load and check that backbone on its node, for no saving in transfers (the generated
images travel to the evaluator anyway).

The base row is stored at `<sweep>/ground_truth/base.json` (with its captions and seed); the first
trial to evaluate from step 0 writes it (a fresh LoRA, or a full fine-tune before its first step,
is the base model), every later evaluation of every trial reports it again as `base_gt_*`, so that
each result row reads "original vs fine-tuned" as the seed project's comparison did. The images
go beside it for the report's panel (sweeps.ground_truth_panel), scaled as the evaluations' kept
images are: the truth (`truth.jpg`), the base model's (`base.jpg`), each trial's at each evaluation
(`<trial>/step-<N>.jpg`).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable

import numpy as np

from sweeps import storage
from sweeps.eval_images import thumbnails
from sweeps.sample_grids import read_grid, save_grid
from sweeps.spec import key_problem
from sweeps.spec_schema import GroundTruthSpec

GROUND_TRUTH_DIR = "ground_truth"
BASE_ROW = f"{GROUND_TRUTH_DIR}/base.json"

ClipPart = Callable[[np.ndarray, np.ndarray, list[str]], dict]  # (generated, truth, captions) -> gt_fd, ...


def ground_truth_problems(gt: GroundTruthSpec) -> list[str]:
    """The folder's and the LPIPS weights' problems, as `eval.ground_truth.<key>: message`."""
    from evaluator.ground_truth import GroundTruthError, read_ground_truth
    from evaluator.lpips_judge import LpipsWeightsMissing, backbone_file

    return (key_problem("eval.ground_truth.folder", lambda: read_ground_truth(gt.folder), GroundTruthError)
            + key_problem("eval.ground_truth.lpips_weights", lambda: backbone_file(gt.lpips_net, gt.lpips_weights),
                          LpipsWeightsMissing))


def plan_entry(gt: GroundTruthSpec) -> dict:
    """What a trial needs (picklable, absolute paths): captions, truth images, seed, LPIPS backbone."""
    from evaluator.ground_truth import read_ground_truth
    from evaluator.lpips_judge import RANDOM_BACKBONE, backbone_file

    pairs = read_ground_truth(gt.folder)
    weights = backbone_file(gt.lpips_net, gt.lpips_weights)
    return {"captions": [p.caption for p in pairs], "images": [p.image_path for p in pairs], "seed": gt.seed,
            "lpips_net": gt.lpips_net, "lpips_weights": RANDOM_BACKBONE if weights is None else str(weights)}


def images_uri(sweep_uri: str, name: str) -> str:
    """`<sweep>/ground_truth/<name>.jpg`: name `truth`, `base` or `<trial>/step-<N>`."""
    return storage.join(sweep_uri, GROUND_TRUTH_DIR, f"{name}.jpg")


def step_name(trial_id: str, step: int) -> str:
    return f"{trial_id}/step-{int(step):06d}"


def save_images(uri: str, images: np.ndarray) -> None:
    buf = io.BytesIO()
    save_grid(thumbnails(images), buf, format="JPEG", quality=90)
    storage.write_bytes(uri, buf.getvalue())


def read_images(uri: str, count: int) -> np.ndarray | None:
    """The `count` images kept at `uri`, or None when there are none."""
    return read_grid(io.BytesIO(storage.read_bytes(uri)), count) if storage.exists(uri) else None


class GroundTruthScorer:
    """`scorer(trainer)`: the gt_* metrics of the trainer's evaluation weights, with the base row (base_gt_*)."""

    def __init__(self, plan, trial_id: str = "local"):
        from evaluator.ground_truth import GroundTruthPair
        from evaluator.lpips_judge import load_lpips

        self.entry = plan.ground_truth
        self.pairs = [GroundTruthPair(c, p) for c, p in zip(self.entry["captions"], self.entry["images"])]
        self.lpips = load_lpips(self.entry["lpips_net"], self.entry["lpips_weights"])
        self.clip_part = remote_clip_part(plan) if plan.evaluator_actor else local_clip_part(plan)
        self.truth: dict[int, np.ndarray] = {}  # per resolution
        self.sweep_uri, self.trial_id = plan.sweep_uri, trial_id
        self.base_uri = storage.join(plan.sweep_uri, BASE_ROW)

    def truth_images(self, resolution: int) -> np.ndarray:
        from evaluator.ground_truth import load_truth_images

        if resolution not in self.truth:
            self.truth[resolution] = load_truth_images(self.pairs, resolution)
        return self.truth[resolution]

    def scores(self, trainer) -> tuple[dict, np.ndarray]:
        """(gt_* of the trainer's images of the captions, those images)."""
        from evaluator.ground_truth import lpips_scores

        truth, captions = self.truth_images(trainer.cfg.resolution), self.entry["captions"]
        images = trainer.sample(captions, [self.entry["seed"]] * len(captions))
        return {**lpips_scores(self.lpips, images, truth), **self.clip_part(images, truth, captions)}, images

    def ensure_base(self, trainer) -> None:
        """Before the first step (a fresh LoRA or an untrained full fine-tune is the base model): the
        base row, once per sweep; its images and the truth's first, the row last (the row says it is done)."""
        if trainer.global_step == 0 and not storage.exists(self.base_uri):
            scores, images = self.scores(trainer)
            save_images(images_uri(self.sweep_uri, "truth"), self.truth_images(trainer.cfg.resolution))
            save_images(images_uri(self.sweep_uri, "base"), images)
            row = {"captions": self.entry["captions"], "seed": self.entry["seed"], "scores": scores}
            storage.write_text(self.base_uri, json.dumps(row, indent=2))

    def __call__(self, trainer) -> dict:
        scores, images = self.scores(trainer)
        save_images(images_uri(self.sweep_uri, step_name(self.trial_id, trainer.global_step)), images)
        base = read_base_row(self.sweep_uri)
        return {**scores, **{f"base_{k}": v for k, v in (base or {}).get("scores", {}).items()}}


def local_clip_part(plan) -> ClipPart:
    """The CLIP part on this process's own CLIP model (no shared evaluator)."""
    from evaluator import ClipModel
    from evaluator.ground_truth import clip_ground_truth_scores

    clip = ClipModel.load(plan.evaluator_model, plan.evaluator_pretrained)
    return lambda generated, truth, captions: clip_ground_truth_scores(
        clip.embed_images(generated), clip.embed_images(truth), clip.embed_texts(captions))


def remote_clip_part(plan) -> ClipPart:
    """The CLIP part on the sweep's shared evaluator: the truth images are put once as a reference (keyed
    by their content), again when the evaluator restarted with an empty cache."""
    from evaluator.remote import MissingReference, ensure_reference, put_reference, reference_key, score_ground_truth_remote
    from sweeps.evaluator_placement import connect_replica

    handle = connect_replica(plan.evaluator_actor, plan.evaluator_local_wait_s)

    def score(generated: np.ndarray, truth: np.ndarray, captions: list[str]) -> dict:
        key = f"{plan.sweep}/ground_truth/{reference_key(truth)}"
        ensure_reference(handle, key, lambda: truth)
        try:
            return score_ground_truth_remote(handle, generated, captions, key, timeout_s=600)
        except MissingReference:  # restarted between the check and the call
            put_reference(handle, key, truth)
            return score_ground_truth_remote(handle, generated, captions, key, timeout_s=600)

    return score


def make_ground_truth_scorer(plan, trial_id: str = "local") -> GroundTruthScorer | None:
    return GroundTruthScorer(plan, trial_id) if plan.ground_truth else None


def read_base_row(sweep_uri: str) -> dict | None:
    """The base model's ground-truth row of a sweep ({captions, seed, scores}), when a trial has written it."""
    uri = storage.join(sweep_uri, BASE_ROW)
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None
