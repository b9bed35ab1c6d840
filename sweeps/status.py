"""`run.py --status`: the sweep's trials as its storage holds them now, without starting or touching any trial."""

from __future__ import annotations

from sweeps import storage
from sweeps.export import EXPORT_DIR, MANIFEST
from sweeps.importance import format_importances, load_sweep_study, param_importances
from sweeps.results import experiment_path, format_table, load_records, sweep_uri
from sweeps.spec_schema import SweepSpec


def sweep_status(spec: SweepSpec, columns: list[str] | None = None) -> str:
    """A table of every trial (params, objective, metric `columns`, state, steps, wall time, its
    bill), the sweep's bill beside the dry run's estimate, and whether an export exists."""
    from sweeps.dry_run import comparison_line

    records = load_records(spec)
    rows = [r.row for r in records]
    lines = [f"sweep {spec.name} at {experiment_path(spec)}", "", format_table(rows, spec, columns), comparison_line(spec, rows)]
    lines.append("\n" + format_importances(param_importances(load_sweep_study(spec), spec)))
    manifest = storage.join(sweep_uri(spec), EXPORT_DIR, MANIFEST)
    lines.append(f"\nexport: {manifest}" if storage.exists(manifest) else "\nexport: not yet (written when the sweep ends)")
    return "\n".join(lines)
