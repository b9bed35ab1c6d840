"""Spec checks of the evaluation's variants (`sweeps.eval_variants`): metric names qualified by a
guidance scale, LoRA strength or img2img strength, the img2img inputs, and `export.scale: best`.

Each returns `path: message` lines for `sweeps.spec_checks.cross_problems`; none loads a model.
"""

from __future__ import annotations

from evaluator.suites import PromptSuite
from evaluator.variant_metrics import AXES, IMG2IMG_METRICS, VARIANT_METRICS, parse_qualified, qualified
from sweeps.eval_variants import init_image_problems


def base_metric(name: str) -> str:
    """`objective@guidance=7.5` -> `objective`; a plain or malformed name as it is."""
    try:
        parts = parse_qualified(name)
    except ValueError:
        return name
    return name if parts is None else parts[0]


def _axis_values(axis: str, suite: PromptSuite | None, lora_scales: list[float] | None) -> list[float]:
    if axis == "guidance":
        return list(suite.guidance_scales or []) if suite is not None else []
    if axis == "lora_scale":
        return list(lora_scales or [])
    return list(dict.fromkeys(s for p in (suite.img2img if suite is not None else []) for s in p.strengths))


def metric_problem(name: str, suite: PromptSuite | None, lora_scales: list[float] | None) -> str | None:
    """What is wrong with an objective naming `name` when it is a variant's metric, else None (a
    plain metric other than img2img's is checked against the trial metrics by the caller)."""
    try:
        parts = parse_qualified(name)
    except ValueError as err:
        return str(err)
    if parts is None:
        if name in IMG2IMG_METRICS and (suite is None or not suite.img2img):
            return f"{name!r} scores the suite's img2img items, and it has none; add img2img items to eval.suite"
        return None
    metric, axis, value = parts
    allowed = IMG2IMG_METRICS if axis == "strength" else VARIANT_METRICS if suite is not None else ("clip_score",)
    if metric not in allowed:
        return (f"{name!r}: {metric!r} is not reported per {AXES[axis]}; per {axis} trials report "
                f"{', '.join(allowed)}")
    values = _axis_values(axis, suite, lora_scales)
    if value not in values:
        where = {"guidance": "the suite's guidance_scales", "lora_scale": "eval.lora_scales",
                 "strength": "the suite's img2img strengths"}[axis]
        listed = ", ".join(qualified(metric, axis, v) for v in values) or f"none: set {where}"
        return f"{name!r}: {format(value, 'g')} is not one of {where} (trials report {listed})"
    return None


def img2img_step_problems(suite: PromptSuite, steps: int) -> list[str]:
    """A strength that leaves no denoising step at the sampling's steps (diffusers runs
    int(steps x strength) of them)."""
    return [f"img2img[{i}].strengths: {s} x train.sampling.steps {steps} leaves no denoising step; "
            f"raise the strength to at least {1 / steps:.3g} or the sampling steps"
            for i, p in enumerate(suite.img2img) for s in p.strengths if int(steps * s) < 1]


def variant_problems(suite: PromptSuite, suite_source: str, steps: int | None) -> list[str]:
    """The suite's img2img inputs, each line prefixed with where the suite is (`eval.suite: <file>`)."""
    out = init_image_problems(suite) + (img2img_step_problems(suite, steps) if steps else [])
    return [f"{suite_source}: {line}" for line in out]


def export_scale_problems(scale, lora_scales: list[float] | None) -> list[str]:
    if scale == "best" and not lora_scales:
        return ["export.scale: best is the best of eval.lora_scales, which is not set; set eval.lora_scales "
                "(e.g. [0.6, 0.85, 1.0]) or give a number"]
    return []


def full_finetune_scale_problems(train: dict, space: dict, lora_scales: list[float] | None) -> list[str]:
    """eval.lora_scales scales the trial's LoRA layers; a full fine-tune has none, so every strength
    would score the same model under different names."""
    searched = space.get("method")
    values = searched.get("values") or [] if isinstance(searched, dict) else []
    if not lora_scales or ("full" not in values and train.get("method") != "full"):
        return []
    where = "space.method searches full" if "full" in values else "train.method is full"
    return [f"eval.lora_scales: {where}, and a full fine-tune has no LoRA strength to vary (every strength would "
            "score the same model); remove eval.lora_scales, or sweep LoRAs only"]
