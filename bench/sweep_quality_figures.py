"""The decision-quality benchmark's figures (bench/sweep_quality.py figures): the grid's best,
rank agreement with the oracle, score stability, and per strategy the exported winner against the
grid's best at each budget, the compute to come within 1% and 2%, and pruning regret; the PNG."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from sweep_quality import (
    BUDGETS,
    RANKED_METRICS,
    SAMPLER_SEEDS,
    STRATEGIES,
    TRAINING_SEEDS,
    VARIANTS,
    grid_compute,
    key,
    with_objective,
)


def spearman(x: list[float], y: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def final(results: list[dict]) -> dict:
    return results[-1]


def grid_figures(table: dict) -> dict:
    """The grid's best, score stability and each metric's rank agreement with the oracle."""
    by_config: dict[tuple, list[dict]] = {}
    for r in table["runs"]:
        by_config.setdefault(key(r["params"], 0)[:3], []).append(final(r["results"]))
    held = {c: float(np.mean([f["heldout_score"] for f in fs])) for c, fs in by_config.items()}
    best_config = max(held, key=held.get)
    obj = {c: [f["objective"] for f in fs] for c, fs in by_config.items()}
    means = np.array([np.mean(v) for v in obj.values()])
    gaps = np.abs(means[:, None] - means[None, :])[np.triu_indices(len(means), 1)]
    corr = {}
    for variant in VARIANTS:
        if variant == "default":
            continue
        configs = list(by_config)
        def value(f: dict, variant: str = variant) -> float:
            return with_objective(f, variant)["objective"]

        corr[f"objective ({variant})"] = {
            "configs": spearman([np.mean([value(f) for f in by_config[c]]) for c in configs], [held[c] for c in configs]),
            "runs": spearman([value(final(r["results"])) for r in table["runs"]],
                             [final(r["results"])["heldout_score"] for r in table["runs"]])}
    for metric, sign in RANKED_METRICS.items():
        if not all(metric in f for fs in by_config.values() for f in fs):
            continue
        configs = list(by_config)
        corr[metric] = {
            "configs": spearman([sign * np.mean([f[metric] for f in by_config[c]]) for c in configs], [held[c] for c in configs]),
            "runs": spearman([sign * f[metric] for r in table["runs"] for f in [final(r["results"])]],
                             [final(r["results"])["heldout_score"] for r in table["runs"]]),
        }
    return {"grid_best": held[best_config], "best_config": list(best_config), "heldout_by_config":
            {"|".join(map(str, c)): v for c, v in sorted(held.items(), key=lambda kv: -kv[1])},
            "objective_seed_std_median": float(np.median([np.std(v) for v in obj.values()])),
            "objective_gap_median": float(np.median(gaps)), "spearman": corr}


def winner(runs: list[dict], limit: float) -> dict | None:
    """What the sweep exports within `limit` compute: the best checkpoint (any evaluation of any
    trial that ended by then) by the objective."""
    best = None
    for r in runs:
        if r["compute_end"] > limit:
            break
        for obj, held, step in zip(r["objective"], r["heldout_score"], r["steps"]):
            if best is None or obj > best["objective"]:
                best = {"objective": obj, "heldout_score": held, "config": r["config"], "step": step}
    return best


def sweep_figures(table: dict, replays: dict, eval_cost: float, grid: dict) -> dict:
    total, best = grid_compute(table, eval_cost), grid["grid_best"]
    full = {key(r["params"], r["seed"]): final(r["results"])["heldout_score"] for r in table["runs"]}
    out = {}
    for strategy in STRATEGIES:
        seeds = [s for s in range(SAMPLER_SEEDS) if f"{strategy}|{s}" in replays]
        if not seeds:
            continue
        per = {f: [] for f in BUDGETS}
        within = {0.01: [], 0.02: []}
        regret, false_rate, pruned_n = [], [], []
        for s in seeds:
            runs = replays[f"{strategy}|{s}"]
            for f in BUDGETS:
                w = winner(runs, f * total)
                per[f].append(w["heldout_score"] / best if w else 0.0)
            for tol in within:
                need = next((r["compute_end"] / total for i, r in enumerate(runs)
                             if (w := winner(runs[: i + 1], float("inf"))) and w["heldout_score"] >= (1 - tol) * best), None)
                within[tol].append(need if need is not None else float("inf"))
            w = winner(runs, 0.25 * total)
            ended = [r for r in runs if r["compute_end"] <= 0.25 * total]
            pruned = [r for r in ended if r["pruned"]]
            beat = [r for r in pruned if w and full[key(r["config"], s % TRAINING_SEEDS)] > w["heldout_score"]]
            regret.append(len(beat))
            pruned_n.append(len(pruned))
            false_rate.append(len(beat) / len(pruned) if pruned else 0.0)
        out[strategy] = {
            **{f"ratio@{int(f * 100)}%": {"median": float(np.median(v)), "worst": float(min(v))} for f, v in per.items()},
            **{f"compute_to_{int(t * 100)}%": float(np.median(v)) for t, v in within.items()},
            "pruning_regret@25%": {"median": float(np.median(regret)), "max": int(max(regret))},
            "false_prune_rate@25%": float(np.mean(false_rate)), "pruned@25%": float(np.median(pruned_n)),
            "sampler_seeds": len(seeds),
        }
    return out


def curves_for_plot(table: dict, replays: dict, eval_cost: float) -> dict:
    total = grid_compute(table, eval_cost)
    xs = np.linspace(0.02, max(BUDGETS), 49)
    out = {}
    for strategy in STRATEGIES:
        rows = []
        for s in range(SAMPLER_SEEDS):
            runs = replays.get(f"{strategy}|{s}")
            if runs:
                rows.append([(w["heldout_score"] if (w := winner(runs, x * total)) else np.nan) for x in xs])
        with warnings.catch_warnings():  # before the first trial ends there is no winner yet (NaN)
            warnings.simplefilter("ignore", RuntimeWarning)
            out[strategy] = np.nanmedian(np.array(rows, float), axis=0) if rows else None
    return {"x": xs, "lines": out}


def plot(table: dict, replays: dict, eval_cost: float, grid: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = curves_for_plot(table, replays, eval_cost)
    fig, (ax, tab) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1.7, 1]})
    for strategy, ys in data["lines"].items():
        if ys is not None:
            ax.plot(100 * data["x"], ys, label=strategy, lw=1.6, ls="--" if "no pruning" in strategy else "-")
    ax.axhline(grid["grid_best"], color="k", lw=1, label="grid's best (mean of 3 seeds)")
    ax.axhline(0.98 * grid["grid_best"], color="k", lw=0.6, ls=":", label="2% below it")
    ax.set_xlabel("compute spent, % of the exhaustive grid (training steps + evaluations)")
    ax.set_ylabel("exported winner's held-out oracle score (median over sampler seeds)")
    ax.set_title("Best-so-far on the toy world")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    rows = [[m, f"{v['configs']:+.2f}", f"{v['runs']:+.2f}"] for m, v in grid["spearman"].items()]
    tab.axis("off")
    t = tab.table(cellText=rows, colLabels=["metric", "Spearman (24 configs)", "(72 runs)"], loc="center",
                  colWidths=[0.52, 0.28, 0.2])
    t.auto_set_font_size(False)
    t.set_fontsize(8.5)
    t.scale(1, 1.3)
    tab.set_title("Rank agreement with the held-out oracle")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(grid: dict, by_variant: dict) -> str:
    lines = [f"grid's best held-out oracle score: {grid['grid_best']:.3f} ({grid['best_config']})"]
    for variant, sweeps in by_variant.items():
        lines += ["", f"objective: {variant}", ""] + sweep_table(sweeps)
    lines += ["", "| metric | Spearman with the oracle, 24 configs (seed means) | 72 runs |", "|---|---|---|"]
    lines += [f"| {m} | {v['configs']:+.2f} | {v['runs']:+.2f} |" for m, v in grid["spearman"].items()]
    lines += ["", f"objective: median spread over training seeds (std) {grid['objective_seed_std_median']:.2f}, "
              f"median gap between configurations {grid['objective_gap_median']:.2f}"]
    return "\n".join(lines)


def sweep_table(sweeps: dict) -> list[str]:
    lines = ["| strategy | winner / best @10% | @25% | @50% | compute to within 2% | to 1% | pruned @25% | regret @25% |",
             "|---|---|---|---|---|---|---|---|"]
    def pct(x: float) -> str:
        return "never (<50%)" if x == float("inf") else f"{100 * x:.0f}%"

    for name, v in sweeps.items():
        def cell(k: str, v=v) -> str:
            return f"{v[k]['median']:.3f} (worst {v[k]['worst']:.3f})"

        lines.append(f"| {name} | {cell('ratio@10%')} | {cell('ratio@25%')} | {cell('ratio@50%')} | "
                     f"{pct(v['compute_to_2%'])} | {pct(v['compute_to_1%'])} | {v['pruned@25%']:.0f} | "
                     f"{v['pruning_regret@25%']['median']:.0f} (max {v['pruning_regret@25%']['max']}) |")
    return lines
