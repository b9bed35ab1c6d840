"""The report's "original vs fine-tuned" panel (`eval.ground_truth`): the base model's ground-truth row
beside the winner's and the next best trials', one column per metric, and the truth images beside
the base model's and the winner's images of the same captions at the same seed, the way a user
compares a fine-tune with its original.

Read from the sweep's storage only (sweeps.ground_truth_scoring wrote it): the base row
(`ground_truth/base.json`), the images kept there, and the trials' best-checkpoint metrics. The
report is thus written the same wherever it runs, with or without the truth folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from evaluator.ground_truth import GROUND_TRUTH_METRICS
from sweeps.eval_images import THUMB
from sweeps.ground_truth_scoring import images_uri, read_base_row, read_images, step_name
from sweeps.results import sweep_uri
from sweeps.sample_grids import labelled_rows

METRIC_NAMES = {"gt_lpips": "LPIPS (mean)", "gt_fd": "FD", "gt_kid": "KID", "gt_cmmd": "CMMD", "gt_clip_t": "CLIP-T"}
BETTER = {**dict.fromkeys(("gt_lpips", "gt_fd", "gt_kid", "gt_cmmd"), "lower"), "gt_clip_t": "higher"}
SHOWN_TRIALS = 3  # the winner and the next best
SHOWN_CAPTIONS = 8  # image columns: a real test split's 50 captions would make a picture 50 thumbnails wide


@dataclass
class GroundTruthRow:
    label: str  # "original" or "fine-tuned"
    who: str  # "base model (builtin:tiny-sd)", "winner 3f2a (step 150)", "trial 9c1d (step 100)"
    values: dict[str, float | None]  # per GROUND_TRUTH_METRICS
    trial_id: str | None = None  # None: the base model
    step: int | None = None  # the trial's evaluation these values are from


@dataclass
class GroundTruthPanel:
    rows: list[GroundTruthRow]  # the original first, then the fine-tuned trials, best first
    captions: list[str]
    seed: int
    images: Image.Image | None = None  # truth / original / fine-tuned winner, one column per caption
    notes: list[str] = field(default_factory=list)  # why a part is missing
    metrics: tuple[str, ...] = GROUND_TRUTH_METRICS

    def header(self) -> list[str]:
        return [f"{METRIC_NAMES[m]} ({BETTER[m]} is better)" for m in self.metrics]


def ground_truth_panel(spec, ranked: list) -> GroundTruthPanel | None:
    """The panel of a sweep whose trials report gt_* and whose base row was written; None otherwise.
    ranked: the scored trials (sweeps.report_data.TrialData), best first."""
    root = sweep_uri(spec)
    base = read_base_row(root)
    tuned = [t for t in ranked if t.metrics.get("gt_lpips") is not None][:SHOWN_TRIALS]
    if base is None or not tuned:
        return None
    scores = base["scores"]
    rows = [GroundTruthRow("original", f"base model ({spec.base_model})", {m: scores.get(m) for m in GROUND_TRUTH_METRICS})]
    for t in tuned:
        step = t.metrics.get("step")
        step = None if _number(step) is None else int(step)
        who = "winner" if t is ranked[0] else "trial"
        rows.append(GroundTruthRow("fine-tuned", f"{who} {t.row.trial_id} (step {step})",
                                   {m: _number(t.metrics.get(m)) for m in GROUND_TRUTH_METRICS}, t.row.trial_id, step))
    panel = GroundTruthPanel(rows, base["captions"], base["seed"])
    if tuned[0] is not ranked[0]:
        panel.notes.append(f"the winner {ranked[0].row.trial_id} reports no ground-truth scores")
    panel.images = _images(root, panel, rows[1])
    return panel


def _images(root: str, panel: GroundTruthPanel, best: GroundTruthRow) -> Image.Image | None:
    """Labelled rows: the truth, the base model's and the best fine-tuned trial's images of the captions."""
    n, shown = len(panel.captions), min(len(panel.captions), SHOWN_CAPTIONS)
    wanted = [("ground truth", images_uri(root, "truth")), (f"original: {panel.rows[0].who}", images_uri(root, "base"))]
    if best.step is not None:
        wanted.append((f"fine-tuned: {best.who}", images_uri(root, step_name(best.trial_id, best.step))))
    rows = []
    for label, uri in wanted:
        images = read_images(uri, n)
        if images is None:
            panel.notes.append(f"{label}: its images were not kept ({uri})")
        else:
            rows.append((label, images[:shown]))
    if not rows:
        return None
    if shown < n:
        panel.notes.append(f"the images of the first {shown} of {n} captions")
    captions, seeds = panel.captions[:shown], [panel.seed] * shown
    return labelled_rows(rows, captions, seeds, per_prompt=1, scale=2 if rows[0][1].shape[1] <= THUMB // 2 else 1)


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
