"""Export of a finished sweep: the top-k LoRAs (kohya + diffusers layouts) with metadata and a sha256 manifest.

Layout in the sweep's folder (local or remote storage):

    export/rank1/lora_kohya.safetensors, lora_diffusers.safetensors, samples.png, info.json
    export/rank2/...
    export/manifest.json          sha256 of every exported file; written last, so it marks a complete export
    best.safetensors, best.json, best_samples.png   the winner (kohya layout when available: UIs load it);
                                                    best.json also holds the sweep's bill (sweeps.bill);
                                                    best_samples.png: labelled rows for the base model, the
                                                    winner and the worst trial, same prompts and seeds

A full fine-tune (`method: full`) exports a whole model instead, built from its checkpoint's trained
(EMA) weights on the base model (trainer.full_export): `model.safetensors`, one original-layout
checkpoint as UIs load it (the `kohya` format's place: the file UIs read; always written, it is
best.safetensors), and with the `diffusers` format `model/`, a diffusers pipeline folder.

Multi-objective sweeps export their Pareto front instead of a top-k. Every file is written atomically.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from sweeps import storage
from sweeps.export_strength import lora_scale_record, stamp_files
from sweeps.results import (
    BASE_SAMPLES,
    LORA_DIFFUSERS,
    LORA_KOHYA,
    SAMPLES_FILE,
    SHOWN_METRICS,
    STATE_DIR,
    TRIAL_INFO,
    TrialRecord,
    load_records,
    scored_checkpoints,
    sweep_uri,
)
from sweeps.sample_grids import labelled_rows, read_grid
from sweeps.spec_schema import SweepSpec

EXPORT_DIR = "export"
MANIFEST = "manifest.json"
LAYOUT_FILES = {"kohya": LORA_KOHYA, "diffusers": LORA_DIFFUSERS}
FULL_MODEL_FILES = {"kohya": "model.safetensors", "diffusers": "model"}  # a full fine-tune's export


class ExportError(RuntimeError):
    """Nothing to export, or a checkpoint without the files export needs; the message says why."""


@dataclass
class Candidate:
    record: TrialRecord
    checkpoint: object  # ray.tune.Checkpoint
    metrics: dict


@dataclass
class ExportResult:
    best: Path  # local path of best.safetensors (a local mirror when the storage is remote)
    manifest: dict
    manifest_uri: str


def ranked(records: list[TrialRecord], spec: SweepSpec) -> list[Candidate]:
    """Each scored trial's best checkpoint, best first by the primary objective."""
    cands = []
    for rec in records:
        scored = scored_checkpoints(rec.result, spec)
        if scored:
            cands.append(Candidate(rec, scored[0][0], scored[0][1]))
    sign = -1 if spec.primary.mode == "max" else 1
    return sorted(cands, key=lambda c: (sign * float(c.metrics[spec.primary.metric]), c.record.row.trial_id))


def choose(records: list[TrialRecord], spec: SweepSpec, cands: list[Candidate] | None = None) -> list[Candidate]:
    """The top-k of `ranked` by the primary objective, or the Pareto front."""
    cands = ranked(records, spec) if cands is None else cands
    if len(spec.objectives) > 1:
        return [c for c in cands if not any(_dominates(o, c, spec) for o in cands if o is not c)]
    return cands[: spec.export.top_k]


def _dominates(a: Candidate, b: Candidate, spec: SweepSpec) -> bool:
    better = False
    for obj in spec.objectives:
        sign = 1 if obj.mode == "max" else -1
        va, vb = sign * float(a.metrics[obj.metric]), sign * float(b.metrics[obj.metric])
        if va < vb:
            return False
        better |= va > vb
    return better


def export_sweep(spec: SweepSpec, records: list[TrialRecord] | None = None, run=None) -> ExportResult:
    """Export the sweep's winners into its storage and return where the winner is; the winner's
    W&B artifact goes on `run` (sweeps.tracking.summary_run) when given."""
    records = load_records(spec) if records is None else records
    everyone = ranked(records, spec)
    chosen = choose(records, spec, everyone)
    if not chosen:
        reasons = "; ".join(f"{r.row.trial_id}: {r.row.reason}" for r in records if r.row.reason)
        raise ExportError(f"no trial reported a finite {spec.primary.metric}; nothing to export ({reasons or 'no trials ran'})")
    root = sweep_uri(spec)
    staging = Path(spec.output_dir) / ".export-staging"
    shutil.rmtree(staging, ignore_errors=True)
    entries, hashes = [], {}
    for rank, cand in enumerate(chosen, start=1):
        entries.append(_export_one(spec, cand, rank, root, staging, hashes))
    worst = everyone[-1] if len(spec.objectives) == 1 and everyone[-1] is not chosen[0] else None
    comparison = _comparison(spec, chosen[0], worst, root, staging)
    from sweeps.dry_run import bill_record

    bill = bill_record(spec, [r.row for r in records])  # what the sweep cost, beside its estimate
    best_files = _export_best(spec, entries[0], root, staging, hashes, comparison, bill)
    manifest = {
        "sweep": spec.name,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "objectives": [o.model_dump() for o in spec.objectives],
        "selection": "pareto_front" if len(spec.objectives) > 1 else f"top_{spec.export.top_k}",
        "entries": entries,
        "best": entries[0]["files"] | {"lora": "best.safetensors", "info": "best.json", "samples": "best_samples.png"},
        "sha256": hashes,
    }
    manifest_uri = storage.join(root, EXPORT_DIR, MANIFEST)
    storage.write_text(manifest_uri, json.dumps(manifest, indent=2, default=str))
    best = _local_best(spec, root, staging)
    from sweeps.tracking import log_winner

    # The artifact mirrors the sweep folder (export/manifest.json + export/rank1/...) so pull verifies it the same way.
    log_winner(spec, {**best_files,
                      f"{EXPORT_DIR}/{MANIFEST}": _local_manifest(staging, manifest)}, manifest["entries"][0], run=run)
    shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(best=best, manifest=manifest, manifest_uri=manifest_uri)


def _export_one(spec: SweepSpec, cand: Candidate, rank: int, root: str, staging: Path, hashes: dict) -> dict:
    rel_dir = f"{EXPORT_DIR}/rank{rank}"
    local = staging / f"rank{rank}"
    local.mkdir(parents=True)
    with cand.checkpoint.as_directory() as src:
        src = Path(src)
        trial = json.loads((src / TRIAL_INFO).read_text())
        if spec.train_config(trial["params"]).method == "full":
            files = _export_full_model(spec, trial, src, local)
        else:
            files = {fmt: name for fmt, name in LAYOUT_FILES.items() if fmt in spec.export.formats and (src / name).is_file()}
            if not files:
                raise ExportError(f"{cand.checkpoint.path}: the checkpoint holds none of the formats {spec.export.formats}")
            for name in files.values():
                shutil.copyfile(src / name, local / name)
        shutil.copyfile(src / SAMPLES_FILE, local / SAMPLES_FILE)
    full = spec.train_config(trial["params"]).method == "full"
    # eval.lora_scales' best, export.scale (sweeps.export_strength); a full fine-tune has no LoRA strength
    strength = None if full else lora_scale_record(spec, cand.metrics)
    if strength is not None:
        stamp_files([local / name for name in files.values()], strength)
    info = {
        "sweep": spec.name,
        "rank": rank,
        "trial_id": cand.record.row.trial_id,
        "params": trial["params"],
        "objectives": {o.metric: cand.metrics.get(o.metric) for o in spec.objectives},
        "metrics": {k: v for k, v in trial["metrics"].items()},
        "step": trial["metrics"].get("step"),
        "train_config": spec.train_config(trial["params"]).model_dump(mode="json"),
        "prompts": trial.get("prompts"),
        "seeds": trial.get("seeds"),
        "formats": {fmt: f"{rel_dir}/{name}" for fmt, name in files.items()},
        **({"lora_scale": strength} if strength is not None else {}),
    }
    (local / "info.json").write_text(json.dumps(info, indent=2, default=str))
    rel_files = {**info["formats"], "samples": f"{rel_dir}/{SAMPLES_FILE}", "info": f"{rel_dir}/info.json"}
    for rel, path in _files_of(local, rel_dir, rel_files.values()).items():
        _put(path, root, rel, hashes)
    return {k: info[k] for k in ("rank", "trial_id", "params", "objectives", "step")} | {"files": rel_files}


def _export_full_model(spec: SweepSpec, trial: dict, src: Path, local: Path) -> dict[str, str]:
    """A full fine-tune's model from its checkpoint: the single file always, the folder with `diffusers`."""
    from trainer.full_export import export_checkpoint

    folder = local / FULL_MODEL_FILES["diffusers"] if "diffusers" in spec.export.formats else None
    meta = {"lorasweep_sweep": spec.name, "lorasweep_trial": str(trial.get("trial_id")),
            "lorasweep_step": str(trial["metrics"].get("step")), "lorasweep_params": json.dumps(trial["params"], default=str)}
    export_checkpoint(spec.base_model, src / STATE_DIR, folder=folder, single_file=local / FULL_MODEL_FILES["kohya"],
                      metadata=meta)
    return {fmt: name for fmt, name in FULL_MODEL_FILES.items() if fmt == "kohya" or folder is not None}


def _files_of(local: Path, rel_dir: str, rels) -> dict[str, Path]:
    """{relative path in the sweep: local file} of each exported file; a folder gives each file in it."""
    out = {}
    for rel in rels:
        path = local / Path(rel).relative_to(rel_dir)
        if path.is_dir():
            out.update({f"{rel}/{p.relative_to(path).as_posix()}": p for p in sorted(path.rglob("*")) if p.is_file()})
        else:
            out[rel] = path
    return out


def _row_label(kind: str, cand: Candidate, spec: SweepSpec) -> str:
    params = ", ".join(f"{k}={_short(v)}" for k, v in sorted(cand.record.row.params.items()))
    shown = [spec.primary.metric, *(m for m in SHOWN_METRICS if m != spec.primary.metric)]
    scores = ", ".join(f"{m}={_short(cand.metrics[m])}" for m in shown if cand.metrics.get(m) is not None)
    return f"{kind} {cand.record.row.trial_id} (step {cand.metrics.get('step')}): {params}; {scores}"


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _comparison(spec: SweepSpec, best: Candidate, worst: Candidate | None, root: str, staging: Path) -> Path:
    """best_samples.png: labelled rows for the base model, the winner and the worst trial, on the
    same prompts and seeds (the winner's grid alone when the base model's images are missing)."""
    staging.mkdir(parents=True, exist_ok=True)
    out = staging / "comparison.png"
    with best.checkpoint.as_directory() as src:
        trial = json.loads((Path(src) / TRIAL_INFO).read_text())
        prompts, seeds = trial.get("prompts"), trial.get("seeds")
        if not prompts or not seeds:  # a checkpoint that does not say what it sampled: its grid as it is
            shutil.copyfile(Path(src) / SAMPLES_FILE, out)
            return out
        rows = [(_row_label("winner", best, spec), read_grid(Path(src) / SAMPLES_FILE, len(prompts)))]
    base_uri = storage.join(root, BASE_SAMPLES)
    if storage.exists(base_uri):
        storage.copy_file(base_uri, staging / BASE_SAMPLES)
        rows.insert(0, (f"base model ({spec.base_model}), no LoRA", read_grid(staging / BASE_SAMPLES, len(prompts))))
    if worst is not None:
        with worst.checkpoint.as_directory() as src:
            other = json.loads((Path(src) / TRIAL_INFO).read_text())
            if (other.get("prompts"), other.get("seeds")) == (prompts, seeds):
                rows.append((_row_label("worst", worst, spec), read_grid(Path(src) / SAMPLES_FILE, len(prompts))))
    labelled_rows(rows, prompts, seeds).save(out)
    return out


def _export_best(spec: SweepSpec, entry: dict, root: str, staging: Path, hashes: dict, comparison: Path,
                 bill: dict) -> dict[str, Path]:
    local = staging / f"rank{entry['rank']}"
    fmt = "kohya" if "kohya" in entry["files"] else "diffusers"
    info = json.loads((local / "info.json").read_text())
    info.update(format=fmt, lora="best.safetensors", objective={
        "metric": spec.primary.metric, "mode": spec.primary.mode, "value": entry["objectives"][spec.primary.metric]},
        bill=bill)
    shutil.copyfile(local / Path(entry["files"][fmt]).name, staging / "best.safetensors")
    shutil.copyfile(comparison, staging / "best_samples.png")
    (staging / "best.json").write_text(json.dumps(info, indent=2, default=str))
    for name in ("best.safetensors", "best_samples.png", "best.json"):
        _put(staging / name, root, name, hashes)
    return _files_of(local, f"{EXPORT_DIR}/rank{entry['rank']}", entry["files"].values())


def _local_manifest(staging: Path, manifest: dict) -> Path:
    path = staging / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, default=str))
    return path


def _put(local: Path, root: str, rel: str, hashes: dict) -> None:
    hashes[rel] = storage.sha256_file(local)
    storage.copy_file(local, storage.join(root, rel))


def _local_best(spec: SweepSpec, root: str, staging: Path) -> Path:
    """For remote storage, the winner is also mirrored into the local output folder, for people to use."""
    out = Path(spec.output_dir)
    if storage.is_uri(root):
        for name in ("best.safetensors", "best.json", "best_samples.png"):
            storage.copy_file(staging / name, out / name)
    return out / "best.safetensors"


def read_manifest(root: str) -> dict:
    path = storage.join(root, EXPORT_DIR, MANIFEST)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path}: no export manifest (is this a finished sweep? run `sweeps/run.py --export-only`)")
    return json.loads(storage.read_text(path))


def verify_files(root: str, manifest: dict, rels: list[str] | None = None) -> None:
    """Check the sha256 of the listed files (default: every file in the manifest) under `root`."""
    for rel in manifest["sha256"] if rels is None else rels:
        if rel not in manifest["sha256"]:
            raise ValueError(f"{rel}: not listed in the export manifest of {root}")
        target = storage.join(root, rel)
        if not storage.exists(target):
            raise FileNotFoundError(f"{target}: listed in the export manifest but missing")
        actual, digest = storage.sha256_file(target), manifest["sha256"][rel]
        if actual != digest:
            raise ValueError(f"{target}: sha256 {actual} does not match the manifest ({digest}); "
                             "the file was changed or damaged after export")
