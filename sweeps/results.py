"""After the sweep: the table of trials and the winner's LoRA with its config and score."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ray import tune

from sweeps.spec import SweepSpec
from sweeps.trainable import LORA_FILE, SAMPLES_FILE


@dataclass
class TrialRow:
    trial_id: str
    params: dict
    objective: float | None
    state: str
    steps: int | None
    wall_s: float | None


def trial_rows(grid: tune.ResultGrid, spec: SweepSpec) -> list[TrialRow]:
    rows = []
    for result in grid:
        m = result.metrics or {}
        value = _best_value(result, spec)
        rows.append(
            TrialRow(
                trial_id=m.get("trial_id", Path(result.path).name),
                params={k: v for k, v in (result.config or {}).items()},
                objective=value,
                state="failed" if result.error else "complete",
                steps=m.get("step"),
                wall_s=m.get("time_total_s"),
            )
        )
    return rows


def format_table(rows: list[TrialRow], metric: str) -> str:
    keys = sorted({k for r in rows for k in r.params})
    header = ["trial", *keys, metric, "state", "steps", "wall s"]
    body = [
        [
            r.trial_id,
            *[_fmt(r.params.get(k)) for k in keys],
            _fmt(r.objective),
            r.state,
            _fmt(r.steps),
            _fmt(r.wall_s),
        ]
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _best_value(result, spec: SweepSpec) -> float | None:
    pairs = _scored_checkpoints(result, spec)
    return pairs[0][1] if pairs else None


def _scored_checkpoints(result, spec: SweepSpec) -> list[tuple[tune.Checkpoint, float]]:
    """The trial's checkpoints with their objective, best first."""
    metric, sign = spec.primary.metric, (-1 if spec.primary.mode == "max" else 1)
    pairs = [
        (ckpt, float(m[metric]))
        for ckpt, m in (result.best_checkpoints or [])
        if m.get(metric) is not None and math.isfinite(float(m[metric]))
    ]
    return sorted(pairs, key=lambda p: sign * p[1])


def export_best(grid: tune.ResultGrid, spec: SweepSpec) -> Path:
    """Copy the best checkpoint's LoRA to `<output>/best.safetensors`, its config and score to best.json."""
    candidates = []
    for result in grid:
        for ckpt, value in _scored_checkpoints(result, spec)[:1]:
            candidates.append((value, result, ckpt))
    if not candidates:
        raise RuntimeError(f"no trial reported a finite {spec.primary.metric}; nothing to export (see the trial errors above)")
    reverse = spec.primary.mode == "max"
    value, result, ckpt = sorted(candidates, key=lambda c: c[0], reverse=reverse)[0]
    out_dir = spec.output_dir
    with ckpt.as_directory() as src:
        trial_info = json.loads((Path(src) / "trial.json").read_text())
        _atomic_copy(Path(src) / LORA_FILE, out_dir / "best.safetensors")
        _atomic_copy(Path(src) / SAMPLES_FILE, out_dir / "best_samples.png")
    info = {
        "sweep": spec.name,
        "trial_id": (result.metrics or {}).get("trial_id"),
        "objective": {"metric": spec.primary.metric, "mode": spec.primary.mode, "value": value},
        "params": trial_info["params"],
        "metrics": trial_info["metrics"],
        "train_config": spec.train_config(trial_info["params"]).model_dump(),
        "lora": str(out_dir / "best.safetensors"),
        "format": "diffusers",
    }
    _atomic_write(out_dir / "best.json", json.dumps(info, indent=2, default=str))
    return out_dir / "best.safetensors"


def _atomic_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
    os.close(fd)
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _atomic_write(dst: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, dst)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
