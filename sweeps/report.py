"""python sweeps/report.py SWEEP [--xyz x=learning_rate,y=rank] [--importance fanova]

SWEEP: a sweep's folder (`<storage>/<name>`) or its URI. Writes `SWEEP/report/index.html`, one
self-contained page (trials table, objective against step, parameter importance, slice and
contour, Pareto front, the winner beside the base model, XYZ grids), and the grids as PNG files
in `SWEEP/report/xyz/`. A running sweep rewrites the page after every finished trial
(`ReportWriter`) and at its end, after the export (`finish_report`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import sys
from pathlib import Path

from ray.tune import Callback

REPORT_DIR = "report"
INDEX = "index.html"
XYZ_DIR = "xyz"
_INLINE_PNG_MAX = 150_000  # bytes; a larger picture goes into the page as JPEG (its PNG file stays beside)


def report_uri(spec) -> str:
    from sweeps import storage
    from sweeps.results import sweep_uri

    return storage.join(sweep_uri(spec), REPORT_DIR)


def write_report(spec, records=None, xyz=None, importance: str = "fanova", trials=None) -> str:
    """Render the report from the sweep's storage (or the given records / in-memory Tune trials)
    and write it; returns where index.html is."""
    return _write(_collect(spec, records, xyz, importance, trials))


def _collect(spec, records=None, xyz=None, importance: str = "fanova", trials=None):
    from sweeps.report_data import XyzChoice, collect
    from sweeps.results import load_records

    records = load_records(spec, trials=trials) if records is None else records
    return collect(spec, records, xyz if isinstance(xyz, XyzChoice) else XyzChoice.parse(xyz), importance)


def _write(data) -> str:
    from sweeps import storage

    root = report_uri(data.spec)
    grids = []
    for name, grid in data.grids.items():
        picture = _png_bytes(grid.image())
        storage.write_bytes(storage.join(root, XYZ_DIR, f"{name}.png"), picture)
        grids.append({"title": grid.title, "note": grid.note, "file": f"{XYZ_DIR}/{name}.png", "src": _inline(picture)})
    grids += _sampled_grids(root)
    index = storage.join(root, INDEX)
    storage.write_text(index, _page(data, grids))
    return index


def _sampled_grids(root: str) -> list[dict]:
    """The grids sampled at export (sweeps.xyz_sampling): LoRA strength, trigger word off."""
    from sweeps import storage
    from sweeps.xyz_sampling import SAMPLED_GRIDS

    out = []
    for name in storage.listdir(storage.join(root, XYZ_DIR)):
        kind = name.split("-", 1)[0]
        if kind in SAMPLED_GRIDS and name.endswith(".png"):
            picture = storage.read_bytes(storage.join(root, XYZ_DIR, name))
            rank = name.removesuffix(".png").split("-", 1)[1]
            out.append({"title": f"{SAMPLED_GRIDS[kind]} ({rank})", "note": "sampled at export",
                        "file": f"{XYZ_DIR}/{name}", "src": _inline(picture)})
    return out


def _page(data, grids: list[dict]) -> str:
    from sweeps import report_plots as plots
    from sweeps.bill import format_bill, sweep_bill
    from sweeps.dry_run import comparison_line
    from sweeps.report_page import data_uri, render_page
    from sweeps.results import sweep_uri
    from sweeps.study_storage import dashboard_target

    spec = data.spec
    header, rows = _table(data)
    trial_rows = [t.row for t in data.trials]
    counts = {s: sum(t.row.state == s for t in data.trials) for s in ("complete", "pruned", "failed", "running", "pending")}
    importance_png = plots.importance_plot(data.importances)
    return render_page({
        "name": spec.name,
        "summary": f"{len(data.trials)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n),
        "objectives": ", ".join(f"{o.metric} ({o.mode})" for o in spec.objectives),
        "written": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "location": sweep_uri(spec),
        "header": header, "rows": rows,
        "bill": [*format_bill(sweep_bill(trial_rows, spec)), comparison_line(spec, trial_rows)],
        "failed": [f"{t.row.trial_id} failed: {t.row.reason}" for t in data.trials if t.row.state == "failed"],
        "curves": data_uri(plots.curves_plot(data), "image/png"),
        "importances": data.importances,
        "importance_plot": data_uri(importance_png, "image/png") if importance_png else None,
        "slices": _slices(data),
        "pareto": _maybe_uri(plots.pareto_plot(data)),
        "comparison": _inline(_png_bytes(data.comparison)) if data.comparison is not None else None,
        "ground_truth": _ground_truth(data.ground_truth),
        "grids": grids,
        "notes": data.notes,
        "journal": dashboard_target(spec),
    })


def _ground_truth(panel) -> dict | None:
    """The "original vs fine-tuned" panel's table cells, bar chart and images, for the page."""
    if panel is None:
        return None
    from sweeps import report_plots as plots

    return {"seed": panel.seed, "header": panel.header(), "notes": panel.notes,
            "rows": [{"label": r.label, "who": r.who, "cells": [_cell(r.values.get(m))["shown"] for m in panel.metrics]}
                     for r in panel.rows],
            "plot": _maybe_uri(plots.ground_truth_plot(panel)),
            "images": _inline(_png_bytes(panel.images)) if panel.images is not None else None}


def _slices(data) -> list[dict]:
    """Slice (and, with two or more parameters, contour) plots of each objective's top parameters."""
    from sweeps import report_plots as plots
    from sweeps.report_page import data_uri

    out = []
    for i, imp in enumerate(data.importances):
        top = imp.top(2)
        if data.study is None or not top:
            continue
        out.append({"caption": f"{imp.metric} against {', '.join(top)} (Optuna slice plot: each complete trial's "
                               "value in the study, its last evaluation)",
                    "src": data_uri(plots.slice_plot(data.study, top, data.spec, i), "image/png")})
        if len(top) == 2:
            out.append({"caption": f"{imp.metric} over {top[0]} and {top[1]} (Optuna contour plot)",
                        "src": data_uri(plots.contour_plot(data.study, top, data.spec, i), "image/png")})
    return out


def _table(data) -> tuple[list[str], list[dict]]:
    from sweeps.report_data import table

    header, values = table(data.trials, data.spec)
    best = data.best.row.trial_id if data.best else None
    rows = []
    for t, row in zip(data.trials, values):
        r = t.row
        cls = " ".join(c for c in (r.state, "winner" if r.trial_id == best else "",
                                   "exported" if r.trial_id in data.exported else "") if c)
        rows.append({"cls": cls, "cells": [_cell(v) for v in row]})
    return header, rows


def _cell(value) -> dict:
    if value is None:
        return {"shown": "-", "sort": None, "text": False}
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return {"shown": str(value), "sort": str(value), "text": True}
    return {"shown": f"{value:.4g}" if isinstance(value, float) else str(value), "sort": repr(value), "text": False}


def _maybe_uri(png: bytes | None) -> str | None:
    from sweeps.report_page import data_uri

    return data_uri(png, "image/png") if png else None


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _inline(picture: bytes) -> str:
    """A picture for the page: its PNG when small, else a JPEG of it (photographs compress ~10x)."""
    from PIL import Image

    from sweeps.report_page import data_uri

    if len(picture) <= _INLINE_PNG_MAX:
        return data_uri(picture, "image/png")
    buf = io.BytesIO()
    Image.open(io.BytesIO(picture)).convert("RGB").save(buf, format="JPEG", quality=85)
    return data_uri(buf.getvalue(), "image/jpeg")


class ReportWriter(Callback):
    """Rewrites the report after every finished (or failed) trial, and when the sweep ends.

    Written at the end of the controller's step in which the trial finished, when Tune has marked
    it terminated, from the in-memory trials (the saved experiment state lags behind them). A
    report that cannot be written is a warning: it never stops the sweep."""

    def __init__(self, spec):
        self.spec = spec
        self._due = False

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._due = True

    def on_trial_error(self, iteration, trials, trial, **info):
        self._due = True

    def on_step_end(self, iteration, trials, **info):
        if self._due:
            self._due = False
            self._write(trials)

    def on_experiment_end(self, trials, **info):
        self._write(trials)

    def _write(self, trials) -> None:
        import logging

        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        # Trials that have not reported yet have no results to fetch; Ray warns of each one.
        analysis_log = logging.getLogger("ray.tune.analysis.experiment_analysis")
        level = analysis_log.level
        analysis_log.setLevel(logging.ERROR)
        try:
            path = write_report(self.spec, trials=list(trials))
        except Exception as err:  # a report is never worth a sweep
            print(f"report not written ({type(err).__name__}: {err})", flush=True)
            return
        finally:
            analysis_log.setLevel(level)
        print(f"report ({done} of {len(trials)} trials finished): {path}", flush=True)


def finish_report(spec, records, run=None) -> str:
    """At the end of a sweep (or `--export-only`), after the export: sample the grids that need
    the exported LoRAs, write the report, and log it to the sweep's W&B summary run."""
    from sweeps.report_data import table
    from sweeps.tracking import log_sweep_summary
    from sweeps.xyz_sampling import sample_export_grids

    for problem in sample_export_grids(spec, report_uri(spec)):
        print(f"report: {problem}", flush=True)
    data = _collect(spec, records)
    index = _write(data)
    if run is not None:
        from sweeps.dry_run import bill_record

        log_sweep_summary(run, spec, *table(data.trials, spec), data.importances, index,
                          bill=bill_record(spec, [t.row for t in data.trials]))
    return index


def load_sweep_spec(location: str):
    """The spec a sweep was started with, from its folder or URI (`<storage>/<name>/spec.json`),
    with `storage` pointing where the folder is now."""
    from sweeps import storage
    from sweeps.spec import SpecError, parse_spec
    from sweeps.stored_spec import SPEC_FILE

    location = location.rstrip("/") if storage.is_uri(location) else str(Path(location).expanduser().resolve())
    record_uri = storage.join(location, SPEC_FILE)
    if not storage.exists(record_uri):
        raise FileNotFoundError(f"{record_uri}: not found; give a sweep's folder (<storage>/<name>, with spec.json)")
    body = json.loads(storage.read_text(record_uri))["spec"]
    parent, name = location.rsplit("/", 1) if storage.is_uri(location) else (str(Path(location).parent), Path(location).name)
    if body.get("name") != name:
        raise SpecError(record_uri, [f"name: the sweep is named {body.get('name')!r} but its folder is {name!r}; "
                                     "rename the folder back (the Optuna study and Tune's state are found by the name)"])
    return parse_spec({**body, "storage": parent}, record_uri)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write the HTML report of a sweep: SWEEP/report/index.html.")
    p.add_argument("sweep", help="a sweep's folder (<storage>/<name>) or URI")
    p.add_argument("--xyz", default=None, metavar="x=PARAM,y=PARAM[,prompt=TEXT,seed=N]",
                   help="the parameter grid's axes (default: the two most important parameters) and item "
                        "(default: the first prompt of the suite at its first seed)")
    p.add_argument("--importance", default="fanova", choices=["fanova", "mean_decrease_impurity", "ped_anova"],
                   help="optuna.importance evaluator (default fanova)")
    args = p.parse_args(argv)
    from sweeps.spec import SpecError
    from sweeps.storage import StorageError

    try:
        spec = load_sweep_spec(args.sweep)
        print(write_report(spec, xyz=args.xyz, importance=args.importance))
    except (FileNotFoundError, SpecError, StorageError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
