"""python sweeps/run.py --space search.yaml [--address ADDR] [--set key=value ...]"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Run a LoRA hyperparameter sweep on Ray Tune + Optuna.")
    p.add_argument("--space", required=True, help="sweep spec YAML (see examples/)")
    p.add_argument("--address", default=None, help="Ray cluster address; local Ray when omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec value, e.g. --set search.num_trials=4 (repeatable)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Heavy imports after argument parsing so --help is instant.
    from sweeps.prepare import prepare_sweep
    from sweeps.results import export_best, format_table, trial_rows
    from sweeps.spec import SpecError, load_spec
    from sweeps.tuner import run_sweep

    try:
        spec = prepare_sweep(load_spec(args.space, args.overrides), args.space)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"sweep {spec.name}: {spec.search.num_trials} trials, {spec.search.max_concurrent} at a time, output {spec.output_dir}", flush=True)
    grid = run_sweep(spec, args.address)
    print("\n" + format_table(trial_rows(grid, spec), spec.primary.metric))
    best = export_best(grid, spec)
    print(f"\nbest config and score: {best.with_name('best.json')}")
    print(f"best LoRA: {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
