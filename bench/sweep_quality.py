"""Does the sweep pick the right LoRA? Measured on the toy world, whose exact oracle knows the truth.

    .venv/bin/python bench/sweep_quality.py grid      # the grid truth: a real sweep (resumable), 89 min here
    .venv/bin/python bench/sweep_quality.py table     # its learning curves -> bench/sweep_quality/grid_table.json
    .venv/bin/python bench/sweep_quality.py enrich    # + metrics recomputed from the kept images (samples.png)
    .venv/bin/python bench/sweep_quality.py cost      # one evaluation's cost in training steps
    .venv/bin/python bench/sweep_quality.py replay    # every strategy x sampler seed on the table (seconds each)
    .venv/bin/python bench/sweep_quality.py real      # real sweeps on Ray Tune, one per strategy (training)
    .venv/bin/python bench/sweep_quality.py compare   # ... must propose and prune as their replays
    .venv/bin/python bench/sweep_quality.py figures   # figures, Spearman table and the PNG

The grid (bench/sweep_quality/grid.yaml) trains every configuration of learning rate x rank x lr
scheduler with 3 training seeds to the demo's full budget, and records every evaluation: the
CLIP objective and its components, val_loss, and the oracle on held-out seeds (heldout_score).
Sweeps over the same values are replayed on that table (bench/sweep_replay.py): the project's
searcher and scheduler decide, the trainable is a lookup. Compute is counted in training steps:
the steps a trial trained plus `eval_cost` steps per evaluation it ran (the `cost` command).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
HERE = ROOT / "bench" / "sweep_quality"
GRID_SPEC = HERE / "grid.yaml"
TABLE = HERE / "grid_table.json"
COST = HERE / "eval_cost.json"
REPLAYS = HERE / "replays.json"
REAL = HERE / "real_vs_replay.json"
FIGURES = HERE / "figures.json"
PNG = HERE / "sweep_quality.png"
SEARCHED = ("learning_rate", "rank", "lr_scheduler")
BUDGETS = (0.10, 0.25, 0.50)  # fractions of the grid's compute (every configuration once, to the end)
TRAINING_SEEDS = 3
SAMPLER_SEEDS = 10

# Strategy name -> (sampler, pruner). Pruner options: the project's defaults (first rung = one
# evaluation interval) with a reduction factor of 2 for the halving family.
STRATEGIES = {
    "tpe+median": ("tpe", {"type": "median", "options": {"n_startup_trials": 3}}),
    "tpe+wilcoxon": ("tpe", {"type": "wilcoxon", "options": {"p_threshold": 0.1}}),
    "tpe+successive_halving": ("tpe", {"type": "successive_halving", "options": {"reduction_factor": 2}}),
    "tpe+hyperband": ("tpe", {"type": "hyperband", "options": {"reduction_factor": 2}}),
    "tpe+asha": ("tpe", {"type": "asha", "options": {"reduction_factor": 2}}),
    "random+asha": ("random", {"type": "asha", "options": {"reduction_factor": 2}}),
    "tpe (no pruning)": ("tpe", {"type": "none"}),
    "random (no pruning)": ("random", {"type": "none"}),
}
# Metrics compared with the oracle (sign: +1 higher is better, -1 lower is better).
RANKED_METRICS = {"objective": 1, "clip_score": 1, "clip_i": 1, "prior_preservation": 1, "trigger_effect": 1,
                  "val_loss": -1, "loss": -1, "cmmd": -1, "clip_kid": -1, "clip_fd": -1, "diversity": 1,
                  "concept_accuracy": 1, "prior_accuracy": 1}


# --------------------------------------------------------------------------- the grid and its table

def grid_spec():
    from sweeps.spec import load_spec

    return load_spec(GRID_SPEC, [])


def run_grid() -> None:
    from sweeps.run import main as run_main

    start = time.perf_counter()
    code = run_main(["--space", str(GRID_SPEC)])
    print(f"grid sweep finished with exit code {code} after {time.perf_counter() - start:.0f} s (this run)")


def make_table() -> dict:
    """Every grid trial's results, from its Ray Tune trial folder (result.json, one line per report)."""
    from sweeps.results import experiment_path

    spec = grid_spec()
    runs = []
    for folder in sorted(Path(experiment_path(spec)).glob("train_trial_*")):
        results = [json.loads(line) for line in (folder / "result.json").read_text().splitlines() if line.strip()]
        params = json.loads((folder / "params.json").read_text())
        keep = [{k: v for k, v in r.items() if isinstance(v, (int, float, list)) and k not in ("timestamp", "pid")}
                for r in results]
        runs.append({"params": {k: params[k] for k in SEARCHED}, "seed": params["seed"], "trial_dir": folder.name,
                     "results": keep})
    complete = [r for r in runs if r["results"] and r["results"][-1]["step"] >= r["results"][-1]["max_train_steps"]]
    table = {"spec": str(GRID_SPEC.relative_to(ROOT)), "interval": spec.eval.interval,
             "max_train_steps": spec.fixed()["max_train_steps"], "runs": complete,
             "wall_s": sum(r["results"][-1]["time_total_s"] for r in complete)}
    TABLE.write_text(json.dumps(table, indent=None, separators=(",", ":")) + "\n")
    print(f"{len(complete)} complete runs of {len(runs)} in {TABLE} ({TABLE.stat().st_size / 1e6:.1f} MB); "
          f"trial wall time in all {table['wall_s'] / 60:.1f} min")
    return table


def enrich_table() -> dict:
    """Every evaluation's suite metrics recomputed from the images its checkpoint kept (samples.png)
    with the evaluator's current code, so that metrics added after the grid ran are in the table
    too; the recorded objective must come out again (a check that the images are the scored ones)."""
    from evaluator import ClipModel
    from evaluator.score import evaluate_suite
    from sweeps.results import experiment_path
    from sweeps.sample_grids import read_grid
    from sweeps.suite_scoring import base_images, training_images
    from sweeps.trial_plan import build_plan
    from trainer.loop import LoraTrainer

    spec, table = grid_spec(), load_table()
    plan = build_plan(spec, GRID_SPEC, local=True)
    trainer = LoraTrainer.build(plan.train_config(table["runs"][0]["params"] | {"seed": 0}), prepared=plan.prepared)
    clip = ClipModel.load(plan.evaluator_model, plan.evaluator_pretrained)
    train_emb, base = clip.embed_images(training_images(trainer)), base_images(plan, trainer)
    worst = 0.0
    for run in table["runs"]:
        by_step = {}
        for ckpt in (Path(experiment_path(spec)) / run["trial_dir"]).glob("checkpoint_*"):
            info = json.loads((ckpt / "trial.json").read_text())
            by_step[info["metrics"]["step"]] = ckpt
        for result in run["results"]:
            images = read_grid(by_step[result["step"]] / "samples.png", len(plan.prompts))
            scores = evaluate_suite(clip, plan.suite_items, images, trigger=plan.trigger_word, base_images=base,
                                    train_emb=train_emb, weights=plan.objective_weights)
            worst = max(worst, abs(scores["objective"] - result["objective"]))
            result.update({k: float(v) for k, v in scores.items() if isinstance(v, float) and k not in result})
    TABLE.write_text(json.dumps(table, separators=(",", ":")) + "\n")
    print(f"recomputed {sum(len(r['results']) for r in table['runs'])} evaluations; "
          f"objective differs from the recorded one by at most {worst:.2e}")
    return table


def load_table() -> dict:
    return json.loads(TABLE.read_text())


def key(params: dict, seed: int) -> tuple:
    return (float(params["learning_rate"]), int(params["rank"]), str(params["lr_scheduler"]), int(seed))


# --------------------------------------------------------------------------- evaluation cost

def measure_cost(repeats: int = 3) -> dict:
    """One evaluation as a sweep runs it (sample the suite, score it, val_loss) against 100 training
    steps, in one process at one thread, alternating; the held-out oracle images are left out (only
    this benchmark draws them)."""
    import torch

    from sweeps.suite_scoring import make_suite_scorer
    from sweeps.trial_plan import build_plan
    from trainer.loop import LoraTrainer

    torch.set_num_threads(1)
    spec = grid_spec()
    plan = build_plan(spec, GRID_SPEC, local=True)
    params = {"learning_rate": 3e-3, "rank": 2, "lr_scheduler": "constant", "seed": 0}
    trainer = LoraTrainer.build(plan.train_config(params), prepared=plan.prepared)
    scorer = make_suite_scorer(plan, trainer)
    train_s, eval_s = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        trainer.train(spec.eval.interval)
        t1 = time.perf_counter()
        images = trainer.sample(plan.prompts, plan.seeds)
        scorer(images, plan.prompts)
        trainer.validation_loss()
        t2 = time.perf_counter()
        train_s.append(t1 - t0)
        eval_s.append(t2 - t1)
    step_s = statistics.median(train_s) / spec.eval.interval
    out = {"step_s": step_s, "eval_s": statistics.median(eval_s), "eval_cost_steps": statistics.median(eval_s) / step_s,
           "train_s": train_s, "eval_s_all": eval_s, "images_per_eval": len(plan.prompts)}
    COST.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return out


def trial_cost(results: list[dict], eval_cost: float) -> float:
    return float(results[-1]["step"]) + len(results) * eval_cost


def grid_compute(table: dict, eval_cost: float) -> float:
    """Every configuration trained once to the end: what an exhaustive grid search costs."""
    n_configs = len({key(r["params"], 0) for r in table["runs"]})
    full = table["max_train_steps"] + (table["max_train_steps"] // table["interval"]) * eval_cost
    return n_configs * full


# --------------------------------------------------------------------------- replays

def sweep_spec(strategy: str, sampler_seed: int, num_trials: int = 500):
    """The sweep a user would run over the grid's values, at one training seed (seed % 3)."""
    from sweeps.spec import parse_spec

    sampler, pruner = STRATEGIES[strategy]
    data = yaml.safe_load(GRID_SPEC.read_text())
    data["space"].pop("seed")
    data["train"]["seed"] = sampler_seed % TRAINING_SEEDS
    data["eval"]["suite"] = str((HERE / data["eval"]["suite"]).resolve())
    name = strategy.replace("+", "-").replace(" (no pruning)", "-nopruning")
    data.update(name=f"sq-{name}-{sampler_seed}", pruner=pruner, export={"top_k": 1},
                search={"sampler": sampler, "num_trials": num_trials, "max_concurrent": 1, "seed": sampler_seed})
    return parse_spec(data, f"{GRID_SPEC} ({strategy}, sampler seed {sampler_seed})")


# Objectives to replay: the composite with other weights (recomputed from the components each
# evaluation recorded; only the default one has the per-item split the wilcoxon pruner pairs), or
# the validation loss (negated: every sweep here maximises `objective`).
VARIANTS = {
    "default": None,
    "no trigger_effect": {"clip_score": 1.0, "clip_i": 10.0, "prior_preservation": 10.0, "trigger_effect": 0.0},
    "clip_i + prior": {"clip_score": 0.0, "clip_i": 10.0, "prior_preservation": 10.0, "trigger_effect": 0.0},
    "-val_loss": "val_loss",
}


def with_objective(result: dict, variant: str) -> dict:
    how = VARIANTS[variant]
    if how is None:
        return result
    out = {k: v for k, v in result.items() if k != "objective_items"}
    out["objective"] = -result["val_loss"] if how == "val_loss" else sum(w * result[k] for k, w in how.items())
    return out


def lookup_for(table: dict, training_seed: int, variant: str = "default"):
    curves = {key(r["params"], r["seed"]): [with_objective(x, variant) for x in r["results"]] for r in table["runs"]}

    def lookup(config: dict) -> list[dict]:
        return curves[key(config, training_seed)]

    return lookup


def replay_one(table: dict, strategy: str, sampler_seed: int, eval_cost: float, max_fraction: float,
               num_trials: int = 500, variant: str = "default") -> list[dict]:
    from sweep_replay import replay

    spec = sweep_spec(strategy, sampler_seed, num_trials)
    limit = max_fraction * grid_compute(table, eval_cost)
    spent = lambda runs: sum(trial_cost(r.results, eval_cost) for r in runs)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        lookup = lookup_for(table, sampler_seed % TRAINING_SEEDS, variant)
        runs = replay(spec, lookup, Path(tmp), lambda done: spent(done) < limit)
    out, total = [], 0.0
    for r in runs:
        total += trial_cost(r.results, eval_cost)
        budget = r.results[-1]["max_train_steps"]
        out.append({"config": {k: r.config[k] for k in SEARCHED}, "steps": [x["step"] for x in r.results],
                    "objective": [x[spec.primary.metric] for x in r.results],
                    "heldout_score": [x["heldout_score"] for x in r.results],
                    "pruned": r.stopped and r.last_step < budget, "compute_end": total})
    return out


def run_replays(table: dict, eval_cost: float, variants: list[str]) -> dict:
    """Every strategy x sampler seed for each objective variant (the wilcoxon pruner only with the
    default objective: the others have no per-item split)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per replay, not per trial
    out = json.loads(REPLAYS.read_text()) if REPLAYS.exists() else {}
    for variant in variants:
        out[variant], t0 = {}, time.perf_counter()
        for strategy in STRATEGIES:
            if variant != "default" and "wilcoxon" in strategy:
                continue
            for s in range(SAMPLER_SEEDS):
                t1 = time.perf_counter()
                runs = out[variant][f"{strategy}|{s}"] = replay_one(table, strategy, s, eval_cost, max(BUDGETS), variant=variant)
                print(f"{variant:<18} {strategy:<24} seed {s}: {len(runs)} trials, {time.perf_counter() - t1:.2f} s", flush=True)
        print(f"{variant}: all replays in {time.perf_counter() - t0:.0f} s", flush=True)
    REPLAYS.write_text(json.dumps(out) + "\n")
    return out


# --------------------------------------------------------------------------- real sweeps vs replays

def run_real(num_trials: int, strategies: list[str]) -> dict:
    """Per strategy, a real sweep (Ray Tune, real training, one trial at a time) at sampler seed 0;
    `compare_real` then checks it proposed and pruned as its replay does. Needs no table."""
    from sweeps.results import load_records
    from sweeps.spec import parse_spec
    from sweeps.trial_plan import build_plan
    from sweeps.tuner import run_sweep

    out = json.loads(REAL.read_text()) if REAL.exists() else {}
    for strategy in strategies:
        data = sweep_spec(strategy, 0, num_trials).model_dump()
        data["storage"] = str(ROOT / ".cache" / "sweep_quality_real")
        spec = parse_spec(data, f"{GRID_SPEC} ({strategy}, real)")
        t0 = time.perf_counter()
        run_sweep(spec, build_plan(spec, GRID_SPEC, local=False))
        rows = load_records(spec)  # in the order they were proposed
        out[strategy] = {"real": [{"config": {k: r.row.params[k] for k in SEARCHED}, "steps": r.row.steps,
                                   "state": r.row.state, "objective": r.result.metrics.get("objective")} for r in rows],
                         "wall_s": time.perf_counter() - t0}
        print(f"{strategy}: real sweep of {len(rows)} trials in {out[strategy]['wall_s']:.0f} s", flush=True)
        REAL.write_text(json.dumps(out, indent=1) + "\n")
    return out


def compare_real(table: dict, eval_cost: float) -> dict:
    """Each real sweep against its replay at the same seed: same configs in the same order, each
    pruned at the same step or complete, and the objective values the table recorded."""
    out = json.loads(REAL.read_text())
    for strategy, entry in out.items():
        real = entry["real"]
        replayed = replay_one(table, strategy, 0, eval_cost, 10.0, len(real))
        want = [{"config": r["config"], "steps": r["steps"][-1], "state": "pruned" if r["pruned"] else "complete",
                 "objective": r["objective"][-1]} for r in replayed]
        same = [(a["config"], a["steps"], a["state"]) == (b["config"], b["steps"], b["state"]) for a, b in zip(real, want)]
        entry.update(replay=want, same_decisions=all(same) and len(real) == len(want),
                     max_objective_diff=max(abs(a["objective"] - b["objective"]) for a, b in zip(real, want)))
        print(f"{strategy}: {len(real)} trials, same configs and decisions as the replay: {entry['same_decisions']} "
              f"(objective differs by at most {entry['max_objective_diff']:.2e})", flush=True)
    REAL.write_text(json.dumps(out, indent=1) + "\n")
    return out


# --------------------------------------------------------------------------- figures (bench/sweep_quality_figures.py)

def figures(table: dict, replays: dict, eval_cost: float) -> dict:
    from sweep_quality_figures import grid_figures, markdown, plot, sweep_figures

    grid = grid_figures(table)
    by_variant = {v: sweep_figures(table, replays[v], eval_cost, grid) for v in VARIANTS if v in replays}
    out = {"eval_cost_steps": eval_cost, "grid_compute_steps": grid_compute(table, eval_cost), "grid": grid,
           "sweeps": by_variant}
    FIGURES.write_text(json.dumps(out, indent=1) + "\n")
    plot(table, replays["default"], eval_cost, grid, PNG)
    print(markdown(grid, by_variant))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["grid", "table", "enrich", "cost", "replay", "real", "compare", "figures"])
    p.add_argument("--real-trials", type=int, default=6, help="trials per real sweep (real)")
    p.add_argument("--strategies", nargs="*", default=None, help="for real: which (default all with pruning)")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), help="for replay: objective variants")
    a = p.parse_args()
    if a.command == "grid":
        return run_grid()
    if a.command == "table":
        return make_table()
    if a.command == "cost":
        return measure_cost()
    if a.command == "enrich":
        return enrich_table()
    if a.command == "real":
        return run_real(a.real_trials, a.strategies or [s for s in STRATEGIES if "no pruning" not in s])
    table, eval_cost = load_table(), json.loads(COST.read_text())["eval_cost_steps"]
    if a.command == "replay":
        run_replays(table, eval_cost, a.variants)
    elif a.command == "compare":
        compare_real(table, eval_cost)
    else:
        figures(table, json.loads(REPLAYS.read_text()), eval_cost)


if __name__ == "__main__":
    main()
