"""The report's plots, drawn with matplotlib (Agg, no display) and returned as PNG bytes.

Why matplotlib and not plotly: the page must open offline and stay small. plotly's figures need
plotly.js (3.5 MB) inlined in the page; matplotlib gives static PNGs of a few tens of kB, is
already in the project, and Optuna ships its slice and contour plots for it
(optuna.visualization.matplotlib), so the report reuses those rather than redrawing them.
"""

from __future__ import annotations

import io
import warnings

import matplotlib

matplotlib.use("Agg")  # the driver has no display; a report is a file

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import optuna  # noqa: E402

from sweeps.importance import Importance, objective_target  # noqa: E402
from sweeps.report_data import ReportData  # noqa: E402

_DPI = 90
_STATE_COLORS = {"complete": "#1f77b4", "pruned": "#ff7f0e", "failed": "#d62728", "running": "#2ca02c", "pending": "#7f7f7f"}


def _style():
    """Each plot in matplotlib's default style, whatever the process set: Optuna's plots switch the
    global style to ggplot, and the rc context undoes that when the plot is drawn."""
    return plt.style.context("default")


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def curves_plot(data: ReportData) -> bytes:
    """Each objective against the training step for every trial; pruned trials end in an x where
    the scheduler stopped them, failed ones in a dot; the winner is drawn bold."""
    with _style():
        return _curves(data)


def _curves(data: ReportData) -> bytes:
    metrics = [o.metric for o in data.spec.objectives]
    fig, axes = plt.subplots(1, len(metrics), figsize=(7.5 * len(metrics), 4.2), squeeze=False)
    best = data.best.row.trial_id if data.best else None
    for ax, metric in zip(axes[0], metrics):
        for t in data.trials:
            points = [(p["step"], p[metric]) for p in t.curve if p.get(metric) is not None]
            if not points:
                continue
            steps, values = zip(*points)
            color = _STATE_COLORS.get(t.row.state, "#7f7f7f")
            wide = t.row.trial_id == best
            ax.plot(steps, values, color="black" if wide else color, lw=2.4 if wide else 0.9,
                    alpha=1.0 if wide else 0.55, zorder=3 if wide else 2, label=f"winner {best}" if wide else None)
            if t.row.state == "pruned":
                at = t.stopped_at if t.stopped_at in steps else steps[-1]
                ax.scatter([at], [values[steps.index(at)]], marker="x", s=40, color=color, zorder=4)
            elif t.row.state == "failed":
                ax.scatter([steps[-1]], [values[-1]], marker="o", s=22, color=color, zorder=4)
        for state, color in _STATE_COLORS.items():
            if any(t.row.state == state for t in data.trials):
                ax.plot([], [], color=color, marker="x" if state == "pruned" else None, label=state)
        ax.set_xlabel("training step")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} at every evaluation ({len(data.trials)} trials)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    return png(fig)


def importance_plot(importances: list[Importance]) -> bytes | None:
    """A bar per parameter and objective: its share of the objective's variance (fANOVA)."""
    shown = [imp for imp in importances if imp.values]
    if not shown:
        return None
    with _style():
        return _importance(shown)


def _importance(shown: list[Importance]) -> bytes:
    fig, axes = plt.subplots(1, len(shown), figsize=(5.5 * len(shown), 0.5 + 0.45 * max(len(i.values) for i in shown)),
                             squeeze=False)
    for ax, imp in zip(axes[0], shown):
        names = list(imp.values)[::-1]
        values = [imp.values[n] for n in names]
        bars = ax.barh(names, values, color="#1f77b4")
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=8, padding=2)
        ax.set_xlim(0, max(1.0, max(values) * 1.15))
        ax.set_xlabel("importance")
        ax.set_title(f"{imp.metric}: {imp.method}, {imp.trials} complete trials", fontsize=10)
    return png(fig)


def slice_plot(study: optuna.Study, params: list[str], spec, index: int) -> bytes:
    """Optuna's slice plot of objective `index` over `params`."""
    with warnings.catch_warnings(), _style():
        warnings.simplefilter("ignore")  # optuna.visualization.matplotlib is "experimental"
        axes = optuna.visualization.matplotlib.plot_slice(
            study, params=params, target=objective_target(spec, index), target_name=spec.objectives[index].metric)
        fig = _figure(axes)
        fig.set_size_inches(4.2 * len(params), 3.8)
        return png(fig)


def contour_plot(study: optuna.Study, params: list[str], spec, index: int) -> bytes:
    """Optuna's contour plot of objective `index` over two parameters."""
    with warnings.catch_warnings(), _style():
        warnings.simplefilter("ignore")
        axes = optuna.visualization.matplotlib.plot_contour(
            study, params=params[:2], target=objective_target(spec, index), target_name=spec.objectives[index].metric)
        fig = _figure(axes)
        fig.set_size_inches(6.0, 4.6)
        return png(fig)


def _figure(axes):
    first = axes.flat[0] if hasattr(axes, "flat") else axes
    return first.figure


def pareto_plot(data: ReportData) -> bytes | None:
    """The first two objectives of every scored trial; the front drawn as a line, the exported
    trials ringed (with three or more objectives, the first two are shown)."""
    if len(data.spec.objectives) < 2:
        return None
    (a, b) = [o.metric for o in data.spec.objectives[:2]]
    points = {t.row.trial_id: (t.metrics[a], t.metrics[b]) for t in data.trials if t.metrics}
    if not points:
        return None
    with _style():
        return _pareto(data, points, a, b)


def _pareto(data: ReportData, points: dict, a: str, b: str) -> bytes:
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    others = [p for tid, p in points.items() if tid not in data.pareto]
    if others:
        ax.scatter(*zip(*others), color="#9a9a9a", s=18, label="dominated")
    front = sorted(points[t] for t in data.pareto if t in points)
    if front:
        ax.plot(*zip(*front), color="#1f77b4", marker="o", ms=5, label="Pareto front")
    exported = [points[t] for t in data.exported if t in points]
    if exported:
        ax.scatter(*zip(*exported), s=160, facecolors="none", edgecolors="#d62728", linewidths=1.8, label="exported")
    ax.set_xlabel(f"{a} ({data.spec.objectives[0].mode})")
    ax.set_ylabel(f"{b} ({data.spec.objectives[1].mode})")
    ax.set_title(f"Pareto front: {len(front)} of {len(points)} scored trials")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png(fig)


def ground_truth_plot(panel) -> bytes | None:
    """One bar chart per ground-truth metric: the original (grey) beside each fine-tuned trial (the
    winner dark), so that which way each metric moved reads at a glance (sweeps.ground_truth_panel)."""
    metrics = [m for m in panel.metrics if any(r.values.get(m) is not None for r in panel.rows)]
    if not metrics:
        return None
    with _style():
        return _ground_truth(panel, metrics)


def _ground_truth(panel, metrics: list[str]) -> bytes:
    from sweeps.ground_truth_panel import BETTER, METRIC_NAMES

    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics), 2.9), squeeze=False)
    labels = ["original"] + [r.who.split(" (")[0] for r in panel.rows[1:]]
    colors = ["#9a9a9a", "#1f4e9c"] + ["#7fa6e0"] * (len(panel.rows) - 2)
    for ax, metric in zip(axes[0], metrics):
        values = [r.values.get(metric) for r in panel.rows]
        shown = [(lab, v, c) for lab, v, c in zip(labels, values, colors) if v is not None]
        bars = ax.bar([s[0] for s in shown], [s[1] for s in shown], color=[s[2] for s in shown])
        ax.bar_label(bars, labels=[f"{s[1]:.3g}" for s in shown], fontsize=7, padding=1)
        ax.set_title(f"{METRIC_NAMES[metric]} ({BETTER[metric]} is better)", fontsize=9)
        ax.tick_params(axis="x", labelsize=7, rotation=30)
        ax.tick_params(axis="y", labelsize=7)
        ax.axhline(0, color="black", lw=0.6)
        ax.margins(y=0.18)  # room for the bars' labels under the title
    fig.tight_layout()
    return png(fig)
