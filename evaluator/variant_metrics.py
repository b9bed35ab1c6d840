"""Metrics of an evaluation sampled several ways: per guidance scale, per LoRA strength, per img2img
strength, and the one number of each metric that objectives, pruners and reports read (pure).

A suite with `guidance_scales` and a sweep with `eval.lora_scales` sample every text-to-image item
once per (guidance scale, LoRA strength) pair: a *variant*. Each variant is scored as a whole suite
(`evaluator.score.suite_metrics`); `aggregate_variants` then reports

- every metric under its plain name as the **mean over all variants** (so `objective`, what the
  pruners and the report read, stays one number per evaluation; `objective_items` is the mean item
  by item, so the wilcoxon pruner's pairs are unchanged);
- the objective and its components per axis value: `objective@guidance=7.5` (the mean over the
  LoRA strengths at that scale), `clip_i@lora_scale=0.85` (the mean over the guidance scales).

img2img items give `img2img_clip_score` (CLIP-T against the prompt) and `img2img_clip_i` (cosine
to the init image: how much of its structure survives), over all their images, and each per
strength: `img2img_clip_i@strength=0.65`. They are reported beside the objective, not in it.

A qualified name's value is written with `format(value, "g")` (`1.0` -> `1`); `canonical_name`
turns what a user writes into it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

from evaluator.metrics import OBJECTIVE_COMPONENTS

# The axes a metric name may be qualified by, and what each value is.
AXES = {"guidance": "guidance scale (suite guidance_scales)", "lora_scale": "LoRA strength (eval.lora_scales)",
        "strength": "img2img strength (suite img2img strengths)"}
# Reported per guidance scale and per LoRA strength: the objective and its components.
VARIANT_METRICS = ("objective", *OBJECTIVE_COMPONENTS)
IMG2IMG_METRICS = ("img2img_clip_score", "img2img_clip_i")
_QUALIFIED = re.compile(r"^(?P<metric>[A-Za-z0-9_]+)@(?P<axis>[a-z_]+)=(?P<value>[^=@\s]+)$")


def qualified(metric: str, axis: str, value: float) -> str:
    """`objective@lora_scale=0.85`: the name a metric has at one value of an axis."""
    return f"{metric}@{axis}={format(float(value), 'g')}"


def parse_qualified(name: str) -> tuple[str, str, float] | None:
    """(metric, axis, value) of a qualified name, or None for a plain one; raises ValueError on a
    name with `@` that is not `metric@axis=value` with a known axis and a number."""
    if "@" not in name:
        return None
    m = _QUALIFIED.match(name)
    if m is None or m["axis"] not in AXES:
        raise ValueError(f"{name!r} is not metric@axis=value with axis one of {', '.join(AXES)} "
                         "(e.g. objective@guidance=7.5)")
    try:
        value = float(m["value"])
    except ValueError:
        raise ValueError(f"{name!r}: {m['value']!r} is not a number") from None
    return m["metric"], m["axis"], value


def canonical_name(name: str) -> str:
    """The name as trials report it (`objective@lora_scale=1.0` -> `objective@lora_scale=1`); a name
    that does not parse is returned as given, for the spec checks to report."""
    try:
        parts = parse_qualified(name)
    except ValueError:
        return name
    return name if parts is None else qualified(*parts)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _mean(values: list):
    """Mean of numbers, item-wise mean of equal-length number lists, key-wise mean of number dicts;
    None when every value is None; else the first value (e.g. objective_skipped)."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    first = present[0]
    if all(_is_number(v) for v in present):
        return float(sum(float(v) for v in present) / len(present))
    if all(isinstance(v, list) and len(v) == len(first) and all(map(_is_number, v)) for v in present):
        return [float(sum(col) / len(col)) for col in zip(*present, strict=True)]
    if all(isinstance(v, dict) and v.keys() == first.keys() and all(map(_is_number, v.values())) for v in present):
        return {k: float(sum(v[k] for v in present) / len(present)) for k in first}
    return first


def aggregate_variants(results: dict[tuple[float | None, float | None], dict],
                       per_guidance: bool, per_lora_scale: bool) -> dict:
    """One evaluation's metrics from its variants' (see the module docstring).

    results: (guidance scale, LoRA strength) -> that variant's metrics (numbers, and lists such as
    per_image and objective_items, are averaged item by item; anything else is the first
    variant's). per_guidance / per_lora_scale: the axis was configured, so its
    qualified metrics are reported (even for a single value).
    """
    if not results:
        raise ValueError("no variant was scored")
    runs = list(results.values())
    keys = list(dict.fromkeys(k for r in runs for k in r))
    out = {k: _mean([r.get(k) for r in runs]) for k in keys}
    for axis, index, wanted in (("guidance", 0, per_guidance), ("lora_scale", 1, per_lora_scale)):
        if not wanted:
            continue
        for value in dict.fromkeys(k[index] for k in results):
            group = [r for k, r in results.items() if k[index] == value]
            for metric in VARIANT_METRICS:
                v = _mean([r.get(metric) for r in group])
                if _is_number(v):
                    out[qualified(metric, axis, value)] = v
    return out


def img2img_metrics(strengths: Sequence[float], clip_t: torch.Tensor | Sequence[float],
                    init_cosine: torch.Tensor | Sequence[float]) -> dict[str, float]:
    """img2img_clip_score / img2img_clip_i over all images and per strength.

    strengths: each image's strength; clip_t: each image's CLIP-T against its prompt's text;
    init_cosine: each image's CLIP cosine to its (resized) init image.
    """
    t = torch.as_tensor(clip_t, dtype=torch.float64).reshape(-1)
    c = torch.as_tensor(init_cosine, dtype=torch.float64).reshape(-1)
    if not (len(strengths) == t.numel() == c.numel()) or t.numel() == 0:
        raise ValueError(f"need one strength, CLIP-T and init cosine per img2img image: got {len(strengths)}, "
                         f"{t.numel()} and {c.numel()}")
    if not (torch.isfinite(t).all() and torch.isfinite(c).all()):
        raise ValueError("img2img scores contain NaN or infinite values")
    out = {"img2img_clip_score": float(t.mean()), "img2img_clip_i": float(c.mean())}
    for s in dict.fromkeys(float(x) for x in strengths):
        where = [i for i, x in enumerate(strengths) if math.isclose(float(x), s)]
        out[qualified("img2img_clip_score", "strength", s)] = float(t[where].mean())
        out[qualified("img2img_clip_i", "strength", s)] = float(c[where].mean())
    return out
