"""`--dry-run`: what a sweep would do, and roughly what it would cost, without starting anything.

The GPU-hour figure is an estimate from stated assumptions (printed with it), not a measurement:

- one optimizer step of SD 1.x LoRA training costs STEP_S_PER_IMAGE seconds per image at 512 px
  on an A10G / RTX 3090-class GPU in fp16 (kohya sd-scripts and diffusers' train_text_to_image_lora
  run at ~2.5 it/s at batch 1), scaling with batch x gradient accumulation x (resolution/512)^2,
  x1.25 when the text encoder is trained too;
- evaluation samples every prompt x seed with SAMPLE_S_PER_UNET_STEP per denoising step (guidance
  doubles the UNet batch) at 512 px, every eval interval; CLIP scoring is negligible beside it;
- SETUP_S per trial for loading the base model and starting the worker;
- a searched field that changes cost counts at its mean over the space (choice: mean of values,
  int/uniform: midpoint, loguniform: geometric mean); no trial is pruned (an upper bound).
"""

from __future__ import annotations

import math
from typing import Any

from sweeps.eval_variants import evaluation_cost
from sweeps.pruner_options import pruner_options
from sweeps.spec_schema import ParamSpace, SweepSpec
from sweeps.trial_plan import input_problems
from trainer.config import TrainConfig

STEP_S_PER_IMAGE = 0.4  # s per training image per optimizer step, SD 1.x at 512 px, fp16, A10G/3090 class
SAMPLE_S_PER_UNET_STEP = 0.05  # s per denoising step per image at 512 px with guidance
SETUP_S = 90.0  # s per trial: worker start, base model load, LoRA setup
ASSUMED_EPOCH_IMAGES = 300  # images x repeats per epoch when the dataset is not readable (30 images x 10)


def _mean(p: ParamSpace) -> float:
    if p.type == "choice":
        nums = [v for v in p.values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return sum(nums) / len(nums) if nums else float("nan")
    if p.type == "loguniform" or p.log:
        return math.sqrt(p.low * p.high)
    return (p.low + p.high) / 2


def _value(spec: SweepSpec, field: str) -> tuple[float | None, str]:
    """A field's value for costing, and how it was chosen."""
    params = spec.searched()
    if field in params:
        return _mean(params[field]), f"mean over space.{field}"
    value = spec.fixed().get(field, TrainConfig.model_fields[field].default)
    return value, "fixed"


def dataset_images(dataset: str, num_repeats: int | None) -> int | None:
    """Images per epoch with repeats, as the trainer reads the dataset (any layout) but without
    opening an image; None when it cannot be read here."""
    from trainer.dataset_layouts import DatasetError
    from trainer.train_data import load_train_data

    # A DreamBooth folder is read only with an instance prompt; the count does not depend on it.
    cfg = TrainConfig(base_model="", dataset=dataset, num_repeats=num_repeats, instance_prompt="(counted)")
    try:
        return len(load_train_data(cfg, verify=False).examples)  # a builtin is written once, then counted
    except DatasetError:
        return None


def estimate(spec: SweepSpec) -> dict[str, Any]:
    """Per-trial and total cost figures (see the module docstring for the assumptions)."""
    batch, _ = _value(spec, "train_batch_size")
    accum, _ = _value(spec, "gradient_accumulation_steps")
    res, _ = _value(spec, "resolution")
    notes = []
    epochs, how = _value(spec, "max_train_epochs")
    if epochs:
        images = dataset_images(spec.dataset, spec.fixed().get("num_repeats"))
        if images is None:
            notes.append(f"dataset not readable here: assumed {ASSUMED_EPOCH_IMAGES} images x repeats per epoch")
            images = ASSUMED_EPOCH_IMAGES
        steps = epochs * images / (batch * accum)
        notes.append(f"{epochs:g} epochs ({how}) x {images} images with repeats / (batch x accumulation)")
    else:
        steps, how = _value(spec, "max_train_steps")
        notes.append(f"{steps:g} steps ({how})")
    scale = (res / 512) ** 2
    te = 1.25 if spec.fixed().get("train_text_encoder") else 1.0
    train_s = steps * STEP_S_PER_IMAGE * batch * accum * scale * te
    prompts, _ = spec.eval_prompts()
    sampling_steps = spec.fixed().get("sampling", {}).get("steps", TrainConfig.model_fields["sampling"].default_factory().steps)
    evals = max(1, math.ceil(steps / spec.eval.interval))
    # Every guidance scale x LoRA strength, and the img2img items (sweeps.eval_variants); the prompts alone by default.
    eval_images, eval_unet_steps = evaluation_cost(spec.prompt_suite(), spec.eval.lora_scales, len(prompts),
                                                   sampling_steps, spec.trigger_word, spec.eval.class_word)
    eval_s = evals * eval_unet_steps * SAMPLE_S_PER_UNET_STEP * scale
    trial_h = (train_s + eval_s + SETUP_S) / 3600
    gpus = spec.resources.gpus_per_trial
    return {
        "steps_per_trial": steps, "evals_per_trial": evals, "eval_images": eval_images,
        "hours_per_trial": trial_h, "trial_hours": trial_h * spec.search.num_trials,
        "gpu_hours": trial_h * spec.search.num_trials * gpus,
        "wall_hours": trial_h * math.ceil(spec.search.num_trials / spec.search.max_concurrent),
        "notes": notes,
    }


def _describe_param(name: str, p: ParamSpace) -> str:
    if p.type == "choice":
        text = f"choice {p.values}"
    else:
        scale = " log" if p.log else ""
        step = f" step {p.step:g}" if p.step else ""
        text = f"{p.type}{scale} [{p.low:g}, {p.high:g}]{step}"
    if p.when:
        cond = " and ".join(f"{k} in {v}" if len(v) > 1 else f"{k} = {v[0]}" for k, v in p.conditions().items())
        text += f"   only when {cond}"
    return f"  {name:<28} {text}"


def _sampler_line(spec: SweepSpec) -> str:
    from sweeps.search import nsga2_population, startup_trials

    s = spec.search
    detail = {
        "tpe": f"multivariate TPE with constant liar, {startup_trials(spec)} random startup trial(s)",
        "gp": f"Gaussian process, {startup_trials(spec)} random startup trial(s)",
        "nsga2": f"NSGA-II, population {nsga2_population(spec)}",
        "grid": "every combination of the grid, shuffled",
        "random": "uniform random",
    }[s.sampler]
    return f"sampler: {s.sampler} ({detail}), seed {s.seed}"


def describe_sweep(spec: SweepSpec) -> str:
    """The resolved space, fixed values, budget, resources, objective(s), sampler, pruner and
    an estimate of GPU-hours; starts nothing."""
    s, r = spec.search, spec.resources
    lines = [f"sweep {spec.name}: base model {spec.base_model}, dataset {spec.dataset}",
             f"budget: {s.num_trials} trials, at most {s.max_concurrent} at a time",
             "objective: " + ", ".join(f"{'maximize' if o.mode == 'max' else 'minimize'} {o.metric}" for o in spec.objectives),
             _sampler_line(spec)]
    if spec.pruner.type == "none":
        lines.append("pruner: none (every trial trains to the end)")
    else:
        opts = ", ".join(f"{k}={v}" for k, v in pruner_options(spec).items())
        unit = "resources in training steps" if spec.pruner.type != "wilcoxon" else "steps are training steps"
        lines.append(f"pruner: {spec.pruner.type} ({opts}; {unit}, judged at each eval)")
    lines.append("searched:")
    lines += [_describe_param(n, p) for n, p in spec.searched().items()]
    fixed = {k: v for k, v in spec.fixed().items() if k not in ("base_model", "dataset") and v is not None}
    lines.append("fixed:")
    lines += [f"  {k:<28} {v}" for k, v in fixed.items()]
    if s.initial_configs:
        lines.append("evaluated first: " + "; ".join(str(c) for c in s.initial_configs))
    lines.append(f"resources per trial: {r.cpus_per_trial:g} CPU, {r.gpus_per_trial:g} GPU")
    est = estimate(spec)
    what = "prompts x seeds" if est["eval_images"] == len(spec.eval_prompts()[0]) else \
        "prompts x seeds x guidance scales x LoRA strengths, + img2img"
    lines.append(f"evaluation: every {spec.eval.interval} steps, {est['eval_images']} images ({what})")
    lines.append(f"estimate: ~{est['steps_per_trial']:.0f} steps and {est['evals_per_trial']} evals per trial "
                 f"({'; '.join(est['notes'])})")
    per = f"{est['hours_per_trial']:.2f} h per trial"
    if r.gpus_per_trial:
        lines.append(f"estimate: {per} -> {est['gpu_hours']:.1f} GPU-hours for {s.num_trials} trials "
                     f"x {r.gpus_per_trial:g} GPU; ~{est['wall_hours']:.1f} h wall with {s.max_concurrent} at a time")
    else:
        lines.append(f"estimate: {per} on a GPU -> {est['trial_hours']:.1f} trial-hours; this spec asks for no GPU, "
                     "so 0 GPU-hours (CPU training is far slower than this estimate)")
    lines.append(f"assumptions: {STEP_S_PER_IMAGE} s per training image per step and {SAMPLE_S_PER_UNET_STEP} s per "
                 f"sampling step at 512 px (A10G/3090-class GPU, fp16), scaled by (resolution/512)^2; {SETUP_S:.0f} s "
                 "setup per trial; no pruning (an upper bound)")
    if spec.base_model.startswith("builtin:"):
        lines.append(f"note: {spec.base_model} is a tiny test model; the per-step figures are for SD 1.x")
    # The dry run may be made on a machine that is not the cluster's: what is missing here is a
    # warning, not an error (the sweep itself refuses it).
    lines += [f"warning: {problem}" for problem in input_problems(spec, local=False)]
    return "\n".join(lines)
