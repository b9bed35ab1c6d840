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

Memory per trial (trainer.memory_estimate: weights, gradients, optimizer states, EMA; activations
come on top) is given for every combination of the searched values that change it (a range at its
high end), with a warning for each that the trial's GPU share (gpus_per_trial x
resources.gpu_memory_gb) cannot hold.
"""

from __future__ import annotations

import itertools
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
ASSUMED_GPU_MEMORY_GB = 24.0  # A10G / RTX 3090 class, the GPU of the time figures above
# The TrainConfig fields that change how much memory a trial's parameters take.
MEMORY_FIELDS = ("method", "train_text_encoder", "use_ema", "optimizer", "mixed_precision", "rank", "target_modules")


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


def _gpu_memory_gb(spec: SweepSpec) -> tuple[float, str]:
    if spec.resources.gpu_memory_gb is not None:
        return spec.resources.gpu_memory_gb, "resources.gpu_memory_gb"
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 1e9, "this machine's GPU"
    return ASSUMED_GPU_MEMORY_GB, "assumed; set resources.gpu_memory_gb"


def _memory_variants(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every combination of the searched values of MEMORY_FIELDS (a range at its high end)."""
    searched = {k: p for k, p in spec.searched().items() if k in MEMORY_FIELDS}
    options = {k: (p.values if p.type == "choice" else [p.extremes()[-1]]) for k, p in searched.items()}
    return [dict(zip(options, combo)) for combo in itertools.product(*options.values())]


def memory_lines(spec: SweepSpec) -> list[str]:
    """`memory per trial ...` lines, and a `warning:` for each variant its GPU share cannot hold."""
    from trainer.config import TrainConfigError
    from trainer.memory_estimate import GB, estimate_memory

    gpus = spec.resources.gpus_per_trial
    per_gpu, how = _gpu_memory_gb(spec)
    share = gpus * per_gpu
    lines = []
    for variant in _memory_variants(spec):
        try:
            est = estimate_memory(spec.train_config(variant), on_cuda=gpus > 0)
        except (TrainConfigError, ValueError) as err:  # a combination the trial itself refuses
            lines.append(f"memory per trial ({_variant(variant)}): not estimated ({str(err).splitlines()[-1].strip()})")
            continue
        lines.append(f"memory per trial ({_variant(variant)}): {est.describe()}; from {est.architecture}")
        if gpus and est.total > share * GB:
            lines.append(f"warning: a trial with {_variant(variant)} needs {est.total / GB:.1f} GB for its parameters "
                         f"alone, more than its GPU share of {share:.1f} GB ({gpus:g} x {per_gpu:.0f} GB, {how}); use "
                         "adamw8bit, fewer trained parts, a LoRA, or more GPU memory per trial")
    return lines


def _variant(variant: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in variant.items()) or "as fixed"


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


def _before_trials(spec: SweepSpec) -> list[str]:
    """What the driver makes once before the trials: captions (`caption:`), class images."""
    from trainer.class_images import missing_class_images
    from trainer.config import TrainConfigError, build_train_config
    from trainer.dataset_captions import caption_counts
    from trainer.dataset_layouts import DatasetError
    from trainer.train_data import resolve_dataset

    lines = []
    if spec.caption is not None:
        try:
            todo, kept = caption_counts(resolve_dataset(spec.dataset), spec.caption)
            counted = f"{todo} image(s) without a caption, {kept} keep theirs"
        except DatasetError:
            counted = "the dataset is not readable here"
        lines.append(f"before the trials: BLIP captions ({spec.caption.model}, {spec.caption.template!r}); {counted}")
    try:
        cfg = build_train_config(spec.fixed())
    except TrainConfigError:
        return lines
    missing = missing_class_images(cfg)
    if missing:
        c = cfg.class_sampling
        minutes = missing * c.steps * SAMPLE_S_PER_UNET_STEP * (cfg.resolution / 512) ** 2 / 60
        where = "on a GPU worker" if spec.resources.gpus_per_trial else "in-process (on a GPU worker when the cluster has GPUs)"
        lines.append(f"before the trials: {missing} of {cfg.num_class_images} class images missing in {cfg.class_data_dir}; "
                     f"made {where} with {c.steps} {c.sampler} steps at guidance {c.guidance_scale:g} "
                     f"(~{minutes:.1f} min on a GPU)")
    return lines


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
    lines += _before_trials(spec)
    lines.append(f"resources per trial: {r.cpus_per_trial:g} CPU, {r.gpus_per_trial:g} GPU")
    from sweeps.evaluator_placement import describe_placement

    lines.append(describe_placement(spec))
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
    lines += memory_lines(spec)
    # The dry run may be made on a machine that is not the cluster's: what is missing here is a
    # warning, not an error (the sweep itself refuses it).
    lines += [f"warning: {problem}" for problem in input_problems(spec, local=False)]
    return "\n".join(lines)


def estimate_vs_measured(spec: SweepSpec, bill) -> dict[str, Any]:
    """The dry run's estimate (no pruning) beside what the sweep's trials measured (`sweeps.bill`):
    per trial, the unpruned wall time (the wall time plus the steps pruning skipped at the measured
    seconds per step) against the estimated one, and the totals in the bill's unit (GPU- or CPU-hours)."""
    est = estimate(spec)
    n = len(bill.trials)
    unpruned_s = bill.wall_s + bill.steps_not_run * (bill.s_per_step or 0.0)
    measured_h = unpruned_s / n / 3600 if n else None
    return {
        "estimated": {"steps_per_trial": round(est["steps_per_trial"], 1), "hours_per_trial": round(est["hours_per_trial"], 6),
                      "unit_hours": round(est["trial_hours"] * bill.units_per_trial, 6), "trials": spec.search.num_trials},
        "measured": {"steps_per_trial": round((bill.steps_run + bill.steps_not_run) / n, 1) if n else None,
                     "hours_per_trial": None if measured_h is None else round(measured_h, 6),
                     "unit_hours": round(bill.trial_hours, 6), "pruning_saved_hours": round(bill.saved_hours, 6),
                     "trials": n},
        "ratio": round(measured_h / est["hours_per_trial"], 4) if measured_h and est["hours_per_trial"] else None,
    }


def format_estimate_vs_measured(cmp: dict, unit: str) -> str:
    e, m = cmp["estimated"], cmp["measured"]
    if not m["trials"]:
        return "estimate vs measured: no trial has run yet"
    ratio = f" = {cmp['ratio']:.3g} x the estimate" if cmp["ratio"] is not None else ""
    return (f"estimate (--dry-run, no pruning): {e['hours_per_trial']:.3g} h and {e['steps_per_trial']:g} steps per trial, "
            f"{e['unit_hours']:.4g} {unit}-hours for {e['trials']} trials; measured: {m['hours_per_trial']:.3g} h and "
            f"{m['steps_per_trial']:g} steps per trial unpruned{ratio}, {m['unit_hours']:.4g} {unit}-hours run + "
            f"{m['pruning_saved_hours']:.4g} saved by pruning over {m['trials']} trials")


def bill_record(spec: SweepSpec, rows: list) -> dict[str, Any]:
    """The sweep's bill (sweeps.bill totals) with the estimate beside it: best.json's and W&B's."""
    from sweeps.bill import sweep_bill

    bill = sweep_bill(rows, spec)
    return {**bill.as_dict(), "estimate_vs_measured": estimate_vs_measured(spec, bill)}


def comparison_line(spec: SweepSpec, rows: list) -> str:
    """The estimate beside the measured bill of the trials table's `rows`, as one line."""
    from sweeps.bill import sweep_bill

    bill = sweep_bill(rows, spec)
    return format_estimate_vs_measured(estimate_vs_measured(spec, bill), bill.unit)
