"""W&B for a sweep: one run per trial (grouped by sweep), eval image grids, the winner as a model artifact.

Everything is logged from inside the trial through Ray's `setup_wandb`: images sent through
`WandbLoggerCallback` hung `Tuner.fit()` at the end (ray 2.60 + wandb 0.31). Offline unless the spec
asks for online AND `WANDB_API_KEY` is set; the key stays in the environment only, never in
the settings handed to trials, the spec, or any file this project writes. Offline runs go to
`<sweep dir>/wandb/wandb/offline-run-*`, inside the sweep's folder, not Ray's session folder. With
remote storage (`s3://`) each finished offline run is also copied to `<sweep>/wandb/offline-run-*/`
in the storage: a trial's run is written on the node that ran it, whose disk does not outlive it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from sweeps.spec_schema import SweepSpec

_QUIET = {"WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}
WANDB_RUNS = "wandb"  # <sweep>/wandb/offline-run-*/ in remote storage


def wandb_mode(spec: SweepSpec) -> str:
    online = spec.tracking.wandb.mode == "online" and bool(os.environ.get("WANDB_API_KEY"))
    return "online" if online else "offline"


def wandb_dir(spec: SweepSpec) -> Path:
    return Path(spec.output_dir) / "wandb"


def trial_settings(spec: SweepSpec) -> dict | None:
    """What a trial needs to open its run (plain values, no secrets); None when tracking is off."""
    cfg = spec.tracking.wandb
    if not cfg.enabled:
        return None
    from sweeps import storage
    from sweeps.results import sweep_uri

    mode = wandb_mode(spec)
    keep = storage.join(sweep_uri(spec), WANDB_RUNS) if spec.is_remote and mode == "offline" else None
    return {"project": cfg.project, "entity": cfg.entity, "group": spec.name, "mode": mode,
            "dir": str(wandb_dir(spec)), "store": keep}


def store_run(run, settings: dict) -> str | None:
    """After `run.finish()`: copy its offline-run folder into the sweep's storage when the settings
    say so; returns where it went."""
    if not settings.get("store"):
        return None
    from sweeps import storage

    folder = Path(run.dir).parent  # <dir>/wandb/offline-run-<time>-<id>/files -> the run's folder
    target = storage.join(settings["store"], folder.name)
    storage.upload_folder(folder, target)
    return target


def own_wandb_services() -> None:
    """Drop a W&B service this process inherited: wandb puts a started service's address in
    WANDB_SERVICE, so every child of a process that used wandb connects to that process's service.
    Called before the driver starts its local Ray, so trials start services of their own. Else a
    driver launched by a process that used wandb (a notebook, a wrapper script, a test session)
    hands that process's service to every trial; a trial of a killed driver then keeps its run open
    there, and the resumed trial fails with "run ID ... is in use"."""
    os.environ.pop("WANDB_SERVICE", None)


def _environment(settings: dict) -> None:
    os.environ.update(_QUIET)
    os.environ["WANDB_MODE"] = settings["mode"]
    os.environ["WANDB_DIR"] = settings["dir"]
    Path(settings["dir"]).mkdir(parents=True, exist_ok=True)


class TrialTracker:
    """The W&B run of one trial; `log_evaluation` after every evaluation."""

    def __init__(self, settings: dict, params: dict, trial_id: str):
        from ray.air.integrations.wandb import setup_wandb

        _environment(settings)
        self.settings = settings
        self.run = setup_wandb(
            config=dict(params), project=settings["project"], entity=settings["entity"],
            group=settings["group"], dir=settings["dir"], mode=settings["mode"], job_type="trial",
        )

    def log_evaluation(self, metrics: dict, images: np.ndarray, prompts: list[str], seeds: list[int]) -> None:
        """The metrics and one labelled grid of the evaluation's images: prompts as rows, seeds as columns."""
        import wandb

        from sweeps.xyz_grids import prompt_seed_grid

        step = int(metrics["step"])
        grid = prompt_seed_grid(images, prompts, seeds, f"step {step}: prompts x seeds", max_rows=len(prompts))
        scalars = {k: v for k, v in metrics.items() if not isinstance(v, list)}  # not the per-item lists
        self.run.log({**scalars, "eval_grid": wandb.Image(grid.image(), caption=f"step {step}")}, step=step)

    def finish(self) -> None:
        self.run.finish()
        store_run(self.run, self.settings)


@contextlib.contextmanager
def summary_run(spec: SweepSpec):
    """The sweep's summary run (the winner, the trials table, parameter importance, the report);
    yields None when tracking is off."""
    settings = trial_settings(spec)
    if settings is None:
        yield None
        return
    import wandb

    _environment(settings)
    run = wandb.init(project=settings["project"], entity=settings["entity"], group=spec.name,
                     job_type="summary", name=f"{spec.name}-summary", dir=settings["dir"], mode=settings["mode"])
    try:
        yield run
    finally:
        run.finish()
        store_run(run, settings)


def log_winner(spec: SweepSpec, files: dict[str, Path], metadata: dict, run=None) -> str | None:
    """The export as a model artifact (files by their name in it) with aliases `best` and the sweep id,
    on `run` (the summary run), or on a summary run of its own."""
    if run is None:
        with summary_run(spec) as own:
            return None if own is None else log_winner(spec, files, metadata, own)
    import wandb

    artifact = wandb.Artifact(f"lora-{spec.name}", type="model", metadata=metadata)
    for name, path in files.items():
        artifact.add_file(str(path), name=name)
    run.log_artifact(artifact, aliases=["best", spec.name])
    return run.dir


def log_sweep_summary(run, spec: SweepSpec, header: list[str], rows: list[list], importances: list,
                      report_index: str, bill: dict | None = None) -> None:
    """On the summary run: a wandb.Table of the trials (sweeps.report_data.table), parameter
    importance (sweeps.importance.Importance) as a table and a bar chart per objective, the
    report folder (index.html + its PNG grids) as an artifact, and the sweep's bill
    (sweeps.dry_run.bill_record) as `bill/*` summary values."""
    import wandb

    from sweeps import storage

    if bill:
        run.summary.update(_bill_summary(bill))

    logged = {"trials": wandb.Table(columns=header, data=[[_cell(v) for v in r] for r in rows], allow_mixed_types=True)}
    for imp in importances:
        imp_table = wandb.Table(columns=["parameter", "importance"], data=[[k, v] for k, v in imp.values.items()])
        logged[f"importance/{imp.metric}"] = imp_table
        if imp.values:
            logged[f"importance/{imp.metric}_chart"] = wandb.plot.bar(
                imp_table, "parameter", "importance", title=f"{imp.metric}: {imp.method} importance ({imp.trials} trials)")
    run.log(logged)
    folder = report_index.rsplit("/", 1)[0]
    artifact = wandb.Artifact(f"report-{spec.name}", type="report", metadata={"sweep": spec.name, "trials": len(rows)})
    with tempfile.TemporaryDirectory() as tmp:
        for rel in ["index.html", *(f"xyz/{n}" for n in storage.listdir(storage.join(folder, "xyz")) if n.endswith(".png"))]:
            storage.copy_file(storage.join(folder, rel), Path(tmp) / rel)
        artifact.add_dir(tmp)  # copied into W&B's staging area now: the folder may go
    run.log_artifact(artifact, aliases=["latest", spec.name])


def _bill_summary(bill: dict) -> dict:
    """`bill/<total>` and `bill/estimate/<figure>`, `bill/measured/<figure>`: the numbers only."""
    out = {f"bill/{k}": v for k, v in bill.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    cmp = bill.get("estimate_vs_measured") or {}
    for side in ("estimated", "measured"):
        out.update({f"bill/{side}/{k}": v for k, v in (cmp.get(side) or {}).items() if v is not None})
    if cmp.get("ratio") is not None:
        out["bill/measured_over_estimate"] = cmp["ratio"]
    return out


def _cell(value):
    """A table cell W&B can type: a number, text or None (a choice may hold booleans or lists)."""
    return value if value is None or (isinstance(value, (int, float, str)) and not isinstance(value, bool)) else str(value)


def sync_command(spec: SweepSpec) -> str | None:
    """The command that uploads this sweep's offline runs, or None when there are none."""
    if spec.is_remote:
        from sweeps import storage
        from sweeps.results import sweep_uri

        stored = storage.join(sweep_uri(spec), WANDB_RUNS)
        if not any(n.startswith("offline-run-") for n in storage.listdir(stored)):
            return None
        copy = "aws s3 cp --recursive" if stored.startswith("s3://") else "gcloud storage cp -r"
        return f"{copy} {stored} ./wandb-{spec.name} && wandb sync ./wandb-{spec.name}/offline-run-*"
    runs = sorted(glob.glob(str(wandb_dir(spec) / "wandb" / "offline-run-*")))
    if not runs:
        return None
    return f"wandb sync {wandb_dir(spec) / 'wandb'}/offline-run-*"


# --- reading offline runs back (tests, debugging) ------------------------------------------------
_BLOCK = 32768
_HEADER = 7  # record header: crc32 (4 bytes), length (2), type (1); the file header is 7 bytes too


def read_records(path: str | Path) -> list:
    """The protobuf records of an offline `run-*.wandb` file (W&B's leveldb-log framing)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file (header {data[:4]!r})")
    records, pos, pending = [], _HEADER, b""
    while pos + _HEADER <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _HEADER:  # block trailer padding
            pos += room
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if length == 0 and kind == 0:
            break
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def read_history(path: str | Path) -> list[dict]:
    """The logged rows (`run.log`) of an offline run file, values JSON-decoded."""
    import json

    rows = []
    for rec in read_records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item})
    return rows

