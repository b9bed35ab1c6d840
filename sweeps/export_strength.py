"""The LoRA strength an exported LoRA is best used at, and the strength baked into its files.

With `eval.lora_scales`, every evaluation reported the objective and its components per strength
(`objective@lora_scale=0.85`, `evaluator.variant_metrics`). The best strength of an exported trial is
the one whose value of the primary objective's metric is best at its checkpoint (in the primary's
mode), when that metric is reported per strength; otherwise the one with the best `objective`, else
`clip_score` (both higher-is-better). It goes into each exported file's safetensors metadata
(`lorasweep_best_lora_scale`, `lorasweep_lora_scales`: each strength's value as JSON,
`lorasweep_lora_scale_metric`) and into `info.json` / `best.json` (`lora_scale`).

The files keep the LoRA at strength 1 (as trained) unless `export.scale` is a number or `best`:
then their up weights are multiplied by it (`trainer.export.restamp_lora_file`), recorded as
`lorasweep_export_scale`, so that a UI's weight 1 gives that strength.
"""

from __future__ import annotations

import json
from pathlib import Path

from evaluator.variant_metrics import VARIANT_METRICS, qualified
from sweeps.spec_schema import SweepSpec
from sweeps.variant_checks import base_metric


def _chooser(spec: SweepSpec, metrics: dict) -> tuple[str, str] | None:
    """(metric, mode) that picks the best strength: the first of the candidates reported per strength."""
    scales = spec.eval.lora_scales or []
    primary = base_metric(spec.primary.metric)
    candidates = [(primary, spec.primary.mode)] if primary in VARIANT_METRICS else []
    candidates += [("objective", "max"), ("clip_score", "max")]
    for metric, mode in candidates:
        if all(isinstance(metrics.get(qualified(metric, "lora_scale", w)), int | float) for w in scales):
            return metric, mode
    return None


def lora_scale_record(spec: SweepSpec, metrics: dict) -> dict | None:
    """What the export records of a trial's strengths (None when neither eval.lora_scales nor
    export.scale asks for anything): best, metric, mode, values per strength, file_scale."""
    scales = spec.eval.lora_scales
    if not scales and spec.export.scale == 1.0:
        return None
    record: dict = {"best": None, "metric": None, "mode": None, "values": {}}
    chooser = _chooser(spec, metrics) if scales else None
    if chooser is not None:
        metric, mode = chooser
        values = {format(w, "g"): float(metrics[qualified(metric, "lora_scale", w)]) for w in scales}
        sign = 1 if mode == "max" else -1
        best = max(scales, key=lambda w: (sign * values[format(w, "g")], w))  # a tie: the stronger
        record.update(best=best, metric=metric, mode=mode, values=values)
    if spec.export.scale == "best":
        record["file_scale"] = record["best"] if record["best"] is not None else 1.0
    else:
        record["file_scale"] = float(spec.export.scale)
    return record


def stamp_files(paths: list[Path], record: dict) -> None:
    """Write the record into each exported LoRA file's metadata, scaled to its file_scale."""
    from trainer.export import restamp_lora_file  # torch and safetensors: only when there is something to stamp

    meta = {}
    if record["best"] is not None:
        meta = {"lorasweep_best_lora_scale": format(record["best"], "g"), "lorasweep_lora_scale_metric": record["metric"],
                "lorasweep_lora_scales": json.dumps(record["values"])}
    for path in paths:
        restamp_lora_file(path, float(record["file_scale"]), meta)
