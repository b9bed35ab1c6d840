"""The data behind each panel of the sweep report, read from the sweep's storage and study.

`collect(spec)` gathers it once: the trials (their table row, best checkpoint's metrics, every
reported result as a curve, where a pruned trial was stopped), the parameter importances, the
Pareto front, what was exported, the winner beside the base model, the ground-truth panel
(sweeps.ground_truth_panel), and the XYZ grids that the images trials saved allow.
sweeps.report_plots draws the plots, sweeps.report_page the page.
Images are read file by file from the checkpoints (never a whole checkpoint: it holds the
trainer state), and only for the trials a panel shows.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field

import numpy as np
import optuna
from PIL import Image

from evaluator.metrics import OBJECTIVE_COMPONENTS
from sweeps import storage
from sweeps.eval_images import THUMB, eval_steps, eval_uri, read_eval_images, thumbnails
from sweeps.ground_truth_panel import GroundTruthPanel, ground_truth_panel
from sweeps.importance import Importance, load_sweep_study, param_importances
from sweeps.results import (
    BASE_SAMPLES,
    SAMPLES_FILE,
    SHOWN_METRICS,
    TRIAL_INFO,
    TrialRecord,
    load_records,
    scored_checkpoints,
    sweep_uri,
)
from sweeps.sample_grids import labelled_rows, read_grid
from sweeps.spec_schema import SweepSpec
from sweeps.xyz_grids import Grid, make_axis, param_grid, pick_items, prompt_seed_grid, steps_grid, trigger_grid


@dataclass
class TrialData:
    record: TrialRecord
    metrics: dict  # the best checkpoint's metrics ({} when it has none with finite objectives)
    curve: list[dict]  # every reported result: its step and objective values, in order
    stopped_at: int | None = None  # a pruned trial: the step at which the scheduler stopped it
    checkpoint: object | None = None  # the best checkpoint (ray.tune.Checkpoint) by the primary objective

    @property
    def row(self):
        return self.record.row


@dataclass
class XyzChoice:
    """`--xyz x=learning_rate,y=rank[,prompt=...,seed=N]`: the parameter grid's axes and item."""

    x: str | None = None
    y: str | None = None
    prompt: str | None = None
    seed: int | None = None

    @classmethod
    def parse(cls, text: str | None) -> XyzChoice:
        if not text:
            return cls()
        # a prompt may hold commas: split only before the next key
        parts = dict(p.split("=", 1) for p in re.split(r",(?=(?:x|y|prompt|seed)=)", text) if "=" in p)
        unknown = set(parts) - {"x", "y", "prompt", "seed"}
        if unknown or not parts:
            raise ValueError(f"--xyz {text!r}: expected x=PARAM[,y=PARAM][,prompt=TEXT][,seed=N]")
        return cls(parts.get("x"), parts.get("y"), parts.get("prompt"), int(parts["seed"]) if "seed" in parts else None)


@dataclass
class ReportData:
    spec: SweepSpec
    trials: list[TrialData]
    importances: list[Importance]
    study: optuna.Study | None
    exported: list[str]  # trial ids in the export manifest, rank order
    pareto: list[str] = field(default_factory=list)  # trial ids on the Pareto front (multi-objective)
    best: TrialData | None = None
    comparison: Image.Image | None = None  # the base model's images beside the winner's
    ground_truth: GroundTruthPanel | None = None  # eval.ground_truth: "original vs fine-tuned"
    grids: dict[str, Grid] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # why a panel is missing

    @property
    def params(self) -> list[str]:
        return sorted({k for t in self.trials for k in t.row.params})


def collect(spec: SweepSpec, records: list[TrialRecord] | None = None, xyz: XyzChoice | None = None,
            importance: str = "fanova") -> ReportData:
    records = load_records(spec) if records is None else records
    trials = trial_data(records, spec)
    study = load_sweep_study(spec)
    data = ReportData(spec, trials, param_importances(study, spec, importance), study, exported_ids(spec))
    sign = -1 if spec.primary.mode == "max" else 1
    ranked = sorted((t for t in trials if t.metrics),
                    key=lambda t: (sign * float(t.metrics[spec.primary.metric]), t.row.trial_id))
    if ranked:
        data.best = ranked[0]
        data.ground_truth = ground_truth_panel(spec, ranked)
    if spec.eval.ground_truth is not None and data.ground_truth is None:
        data.notes.append("eval.ground_truth: no trial reported ground-truth scores beside the base model's row yet")
    if len(spec.objectives) > 1:
        data.pareto = pareto_front(trials, spec)
    if data.best is not None:
        add_sample_panels(data, xyz or XyzChoice())
    return data


def trial_data(records: list[TrialRecord], spec: SweepSpec) -> list[TrialData]:
    from sweeps.study_storage import load_pruned, study_uri

    pruned = load_pruned(study_uri(spec))
    return [_trial_data(r, spec, pruned) for r in records]


def table(trials: list[TrialData], spec: SweepSpec) -> tuple[list[str], list[list]]:
    """The trials table: header and one row of raw values per trial (the page and W&B format them),
    each trial's bill (sweeps.bill: trial-hours, steps not run when pruned) last."""
    from sweeps.bill import sweep_bill

    params = sorted({k for t in trials for k in t.row.params})
    columns = table_columns(spec, trials)
    bill = sweep_bill([t.row for t in trials], spec)
    startup = any(t.row.startup_s is not None for t in trials)  # what each trial spent before its first step
    header = ["trial", *params, *columns, "state", "steps", "trial s", f"{bill.unit} h", "steps not run",
              *(["start-up s"] if startup else [])]
    rows = [[t.row.trial_id, *(t.row.params.get(p) for p in params), *(t.metrics.get(c) for c in columns),
             t.row.state, t.row.steps, t.row.wall_s, b.trial_hours, b.steps_not_run or None,
             *([t.row.startup_s] if startup else [])]
            for t, b in zip(trials, bill.trials)]
    return header, rows


def _trial_data(record: TrialRecord, spec: SweepSpec, pruned: dict[str, int]) -> TrialData:
    scored = scored_checkpoints(record.result, spec)
    curve = curve_of(record, spec)
    stopped = None
    if record.row.state == "pruned":
        stopped = pruned.get(record.row.trial_id, curve[-1]["step"] if curve else record.row.steps)
    return TrialData(record, dict(scored[0][1]) if scored else {}, curve, stopped, scored[0][0] if scored else None)


def curve_of(record: TrialRecord, spec: SweepSpec) -> list[dict]:
    """Every result the trial reported that carries a step: {step, <objective>: value, ...}."""
    frame = record.result.metrics_dataframe
    names = [o.metric for o in spec.objectives]
    if frame is None or "step" not in frame:
        return []
    out = []
    for rec in frame.to_dict("records"):
        step = rec.get("step")
        if step is None or (isinstance(step, float) and math.isnan(step)):
            continue
        out.append({"step": int(step), **{m: _number(rec.get(m)) for m in names}})
    return out


def _number(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def table_columns(spec: SweepSpec, trials: list[TrialData]) -> list[str]:
    """The objectives, then the composite objective's components and the shown metrics that trials report."""
    objectives = [o.metric for o in spec.objectives]
    extra = [m for m in (*OBJECTIVE_COMPONENTS, *SHOWN_METRICS) if m not in objectives]
    present = [m for m in dict.fromkeys(extra) if any(t.metrics.get(m) is not None for t in trials)]
    return objectives + present


def exported_ids(spec: SweepSpec) -> list[str]:
    from sweeps.export import EXPORT_DIR, MANIFEST

    path = storage.join(sweep_uri(spec), EXPORT_DIR, MANIFEST)
    if not storage.exists(path):
        return []
    return [e["trial_id"] for e in json.loads(storage.read_text(path))["entries"]]


def pareto_front(trials: list[TrialData], spec: SweepSpec) -> list[str]:
    """Trial ids that no other trial dominates, on the best-checkpoint values export compares."""
    from sweeps.export import choose

    return [c.record.row.trial_id for c in choose([t.record for t in trials], spec)]


# --- images --------------------------------------------------------------------------------
def checkpoint_file(checkpoint, name: str) -> bytes:
    """One file of a checkpoint, local or remote, without fetching the rest of it."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{name}") as f:
        return f.read()


def checkpoint_samples(checkpoint) -> tuple[dict, np.ndarray]:
    """(trial.json, its evaluation's images) of a checkpoint."""
    info = json.loads(checkpoint_file(checkpoint, TRIAL_INFO))
    images = read_grid(io.BytesIO(checkpoint_file(checkpoint, SAMPLES_FILE)), len(info["prompts"]))
    return info, images


def suite_kinds(spec: SweepSpec, prompts: list[str], seeds: list[int]) -> list[str] | None:
    """Each item's suite kind, when these are the prompts and seeds the spec's suite expands to."""
    suite = spec.prompt_suite()
    if suite is None:
        return None
    from evaluator.suites import expand_suite

    items = expand_suite(suite, spec.trigger_word, spec.eval.class_word)
    if [it.prompt for it in items] != list(prompts) or [it.seed for it in items] != list(seeds):
        return None
    return [it.kind for it in items]


def add_sample_panels(data: ReportData, xyz: XyzChoice) -> None:
    """The winner beside the base model, and the XYZ grids made from images trials saved."""
    spec, best = data.spec, data.best
    info, images = checkpoint_samples(best.checkpoint)
    prompts, seeds = info["prompts"], info["seeds"]
    kinds = suite_kinds(spec, prompts, seeds)
    data.comparison = comparison(data, images, prompts, seeds)
    tid = best.row.trial_id
    data.grids["steps"] = winner_steps(data, prompts, seeds, pick_items(prompts, seeds, kinds))
    step = info["metrics"].get("step")
    data.grids["seeds"] = prompt_seed_grid(images, prompts, seeds, f"winner {tid}: prompts x seeds, step {step}")
    if kinds:
        grid = trigger_grid(images, prompts, seeds, kinds, spec.trigger_word, f"winner {tid}: the trigger-word test")
        if grid is not None:
            data.grids["trigger"] = grid
    grid = params_grid(data, xyz, prompts, seeds)
    if grid is not None:
        data.grids["params"] = grid


def comparison(data: ReportData, images: np.ndarray, prompts: list[str], seeds: list[int]) -> Image.Image:
    """Labelled rows: the base model (when its images were saved) and the winner, same prompts and seeds."""
    best = data.best
    label = f"winner {best.row.trial_id} (step {best.metrics.get('step')}): " + ", ".join(
        f"{k}={_short(v)}" for k, v in sorted(best.row.params.items()))
    rows = [(label, thumbnails(images))]
    base = storage.join(sweep_uri(data.spec), BASE_SAMPLES)
    if storage.exists(base):
        base_images = read_grid(io.BytesIO(storage.read_bytes(base)), len(prompts))
        rows.insert(0, (f"base model ({data.spec.base_model}), no LoRA", thumbnails(base_images)))
    else:
        data.notes.append("the base model's images were not saved (base_samples.png): the winner is shown alone")
    # the toy world's 64 px images twice their size, SD's 512 px ones scaled down to THUMB
    return labelled_rows(rows, prompts, seeds, scale=2 if rows[0][1].shape[1] <= THUMB // 2 else 1)


def winner_steps(data: ReportData, prompts: list[str], seeds: list[int], picked: list[int]) -> Grid:
    """Every evaluation of the winner, from the images each evaluation kept (sweeps.eval_images),
    else from the checkpoints Tune kept."""
    root, tid = sweep_uri(data.spec), data.best.row.trial_id
    by_step = {s: read_eval_images(root, tid, s, len(prompts)) for s in eval_steps(root, tid)}
    note = "every evaluation of the winner"
    if not by_step:
        for ckpt, metrics in data.best.record.result.best_checkpoints or []:
            info, images = checkpoint_samples(ckpt)
            if (info["prompts"], info["seeds"]) == (prompts, seeds):
                by_step[int(metrics["step"])] = images
        note = "the evaluations whose checkpoints Tune kept (this sweep kept no per-evaluation images)"
    return steps_grid(by_step, prompts, seeds, picked, f"winner {tid}: training steps", note)


def params_grid(data: ReportData, xyz: XyzChoice, prompts: list[str], seeds: list[int]) -> Grid | None:
    """Two parameters against each other (`--xyz`; by default the two most important): one prompt
    at one seed, the best trial of each cell."""
    spec = data.spec
    names = data.params
    important = data.importances[0].values
    ranked = [p for p in important if p in names] + [p for p in names if p not in important]
    x = xyz.x or (ranked[0] if ranked else None)
    y = xyz.y or next((p for p in ranked if p != x), None)
    if x is None:
        return None
    for name in (x, y):
        if name is not None and name not in names:
            raise ValueError(f"--xyz: {name!r} is not a searched parameter of this sweep ({', '.join(names)})")
    prompt = xyz.prompt or prompts[0]
    seed = xyz.seed if xyz.seed is not None else next(s for p, s in zip(prompts, seeds) if p == prompt)
    if (prompt, seed) not in set(zip(prompts, seeds)):
        raise ValueError(f"--xyz: the evaluations have no image of {prompt!r} at seed {seed}")
    searched = spec.searched()
    axes = [make_axis(n, [t.row.params.get(n) for t in data.trials], _is_log(searched.get(n)), choice=_is_choice(searched.get(n)))
            if n else None for n in (x, y)]
    scored = {t.row.trial_id: t for t in data.trials if t.metrics}
    values = [(tid, t.row.params, _number(t.metrics.get(spec.primary.metric))) for tid, t in scored.items()]
    return param_grid(values, axes[0], axes[1], spec.primary.metric, spec.primary.mode, prompt, seed,
                      lambda tid: _image_of(data, scored[tid], prompts, seeds, prompt, seed))


def _is_choice(param) -> bool:
    return param is not None and param.type == "choice"


def _is_log(param) -> bool:
    return param is not None and (param.type == "loguniform" or bool(getattr(param, "log", False)))


def _image_of(data: ReportData, trial: TrialData, prompts: list[str], seeds: list[int], prompt: str, seed: int):
    """The trial's image of `prompt` at `seed` at its best evaluation: from the evaluation's kept
    images (128 px, a few kB) when there are some, else from its checkpoint's full-size grid."""
    root, tid, step = sweep_uri(data.spec), trial.row.trial_id, trial.metrics.get("step")
    if step is not None and storage.exists(eval_uri(root, tid, int(step))):
        images, pairs = read_eval_images(root, tid, int(step), len(prompts)), list(zip(prompts, seeds))
    else:
        info, images = checkpoint_samples(trial.checkpoint)
        pairs = list(zip(info["prompts"], info["seeds"]))
    return images[pairs.index((prompt, seed))] if (prompt, seed) in pairs else None


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
