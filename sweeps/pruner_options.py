"""The pruner's options as the sweep runs it: the spec's over the project's defaults.

Apart from `sweeps.pruning` (which imports Ray) so that the spec checks can build and test a
pruner's options before Ray starts.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from sweeps.spec_schema import ParamSpace, SweepSpec
from trainer.config import TrainConfig

# Optuna pruner per `pruner.type` (options are checked against these classes' signatures).
OPTUNA_PRUNERS = {
    "median": "MedianPruner", "percentile": "PercentilePruner", "successive_halving": "SuccessiveHalvingPruner",
    "hyperband": "HyperbandPruner", "wilcoxon": "WilcoxonPruner",
}
# Options the project sets itself for ASHA (it reads the trainable's `step`, the spec's objective).
ASHA_RESERVED = ("time_attr", "metric", "mode")


def max_steps(spec: SweepSpec) -> int | None:
    """The longest training a trial can run, in steps; None when it is given in epochs."""
    space, fixed = spec.space, spec.fixed()
    if "max_train_epochs" in space or fixed.get("max_train_epochs") is not None:
        return None
    raw = space.get("max_train_steps")
    if isinstance(raw, dict):
        try:
            return int(max(ParamSpace(**raw).extremes()))
        except (ValidationError, TypeError, ValueError):
            return None
    return int(fixed.get("max_train_steps", TrainConfig.model_fields["max_train_steps"].default))


def pruner_options(spec: SweepSpec) -> dict[str, Any]:
    """The pruner's keyword arguments. Its resources are training steps (the trainable reports
    `step`); by default the first rung is one evaluation interval."""
    kind, opts = spec.pruner.type, dict(spec.pruner.options)
    if kind in ("successive_halving", "hyperband"):
        opts.setdefault("min_resource", spec.eval.interval)
    if kind == "hyperband":
        opts.setdefault("max_resource", max_steps(spec) or "auto")
    if kind == "asha":
        opts.setdefault("grace_period", spec.eval.interval)
        if max_steps(spec) is not None:
            opts.setdefault("max_t", max_steps(spec))
    return opts
