"""Checks of a SweepSpec that span fields and sections (conditions, search, pruner, eval).

Each returns `path: message` lines; `sweeps.spec.parse_spec` gathers them all before Ray starts.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from typing import Any

from pydantic import BaseModel, ValidationError

from evaluator.ground_truth import GROUND_TRUTH_METRICS
from evaluator.judge_metrics import JUDGE_METRICS
from evaluator.metrics import GOOD_DIRECTION, OBJECTIVE_COMPONENTS, REPORTED_METRICS, ObjectiveWeights
from evaluator.variant_metrics import IMG2IMG_METRICS
from sweeps.pruner_options import ASHA_RESERVED, OPTUNA_PRUNERS, pruner_options
from sweeps.spec_schema import (
    EvalSpec,
    EvaluatorSpec,
    ExportSpec,
    ObjectiveSpec,
    ParamSpace,
    PrunerSpec,
    ResourcesSpec,
    SearchSpec,
    StudySpec,
    SweepSpec,
    search_order,
)
from sweeps.variant_checks import (
    base_metric,
    export_scale_problems,
    full_finetune_scale_problems,
    metric_problem,
    variant_problems,
)
from toyworld.lora_task import HELDOUT_METRICS
from toyworld.oracle import ORACLE_METRICS
from trainer.config import TrainConfig, TrainConfigError, format_validation_error
from trainer.validation import VALIDATION_METRICS

# What a trial reports and an objective may name: the training loss, the evaluator's scores, the
# trainer's validation loss, with `eval.oracle: toy_world` the oracle's, with a judge configured its metric,
# with img2img suite items theirs, with eval.ground_truth its; and any of the variants' `metric@axis=value`
# (sweeps.variant_checks).
TRIAL_METRICS = (*REPORTED_METRICS, "loss", *VALIDATION_METRICS, *ORACLE_METRICS, *HELDOUT_METRICS, *JUDGE_METRICS,
                 *IMG2IMG_METRICS, *GROUND_TRUTH_METRICS)
# The better mode of the trial metrics that have one in every sweep (losses and distances down,
# scores and accuracies up): an objective asking the other way would search, prune and export
# for the worst trials.
GOOD_MODES = {**GOOD_DIRECTION, **dict.fromkeys(("loss", *VALIDATION_METRICS), "min"),
              **dict.fromkeys((*ORACLE_METRICS, *HELDOUT_METRICS, *JUDGE_METRICS, "img2img_clip_score", "gt_clip_t"), "max"),
              **dict.fromkeys(("gt_lpips", "gt_fd", "gt_kid", "gt_cmmd"), "min")}
# Each judge's metric, its `evaluator.<key>`, and what to give there.
JUDGES = {"dino_i": ("dino", "the folder of a local DINO/DINOv2 model, config.json + model.safetensors"),
          "aesthetic": ("aesthetic", "a LAION aesthetic head file, .pth or .safetensors, for the evaluator's CLIP model")}


def space_problems(spec: SweepSpec) -> list[str]:
    problems = []
    fields = set(TrainConfig.model_fields)
    for name, raw in spec.space.items():
        if name not in fields:
            problems.append(f"space.{name}: not a training field; searchable fields are {', '.join(sorted(fields))}")
            continue
        if not isinstance(raw, dict):
            continue
        try:
            param = ParamSpace(**raw)
        except ValidationError as err:
            problems += format_validation_error(err, f"space.{name}")
            continue
        problems += [f"space.{name}.{p}" for p in param.problems()]
        for value in param.extremes():
            try:
                spec.train_config({name: value})
            except TrainConfigError as err:
                problems += [f"space.{name}: value {value!r} is invalid ({msg})"
                             for path, msg in err.problems if path.split(".")[0] == name]
    return problems


def train_problems(spec: SweepSpec) -> list[str]:
    """Fixed values checked with each searched field at its first extreme."""
    sample = {k: p.extremes()[0] for k, p in _valid_params(spec).items()}
    both = [f"train.{k}: also searched (space.{k}), whose value every trial uses; remove it from train"
            for k in sorted(set(spec.train) & set(spec.space))]
    try:
        spec.train_config(sample)
    except TrainConfigError as err:
        return both + [f"train.{path}: {msg}" for path, msg in err.problems if path.split(".")[0] not in sample]
    return both


def _valid_params(spec: SweepSpec) -> dict[str, ParamSpace]:
    out = {}
    for name, raw in spec.space.items():
        if isinstance(raw, dict) and name in TrainConfig.model_fields:
            try:
                out[name] = ParamSpace(**raw)
            except ValidationError:
                pass
    return out


def _section(spec: SweepSpec, name: str, cls: type[BaseModel]) -> Any:
    """A section as its model, or None when it did not validate (its problems are already listed)."""
    value = getattr(spec, name, None)
    if isinstance(value, cls):
        return value
    try:
        return cls(**(value or {})) if isinstance(value, dict) or value is None else None
    except (ValidationError, TypeError):
        return None


def _objectives(spec: SweepSpec) -> list[ObjectiveSpec]:
    raw = getattr(spec, "objective", None)
    out = []
    for item in raw if isinstance(raw, list) else [raw]:
        if isinstance(item, ObjectiveSpec):
            out.append(item)
        elif isinstance(item, dict):
            try:
                out.append(ObjectiveSpec(**item))
            except ValidationError:
                pass  # already reported by the model's own validation
    return out


def _objective_problems(spec: SweepSpec, objectives: list[ObjectiveSpec]) -> list[str]:
    single = not isinstance(getattr(spec, "objective", None), list)
    out, seen = [], set()
    for i, o in enumerate(objectives):
        path = "objective.metric" if single else f"objective[{i}].metric"
        variant = metric_problem(o.metric, *_suite_and_lora_scales(spec))
        if variant is not None:
            out.append(f"{path}: {variant}")
        elif base_metric(o.metric) not in TRIAL_METRICS:
            out.append(f"{path}: unknown metric {o.metric!r}; trials report {', '.join(TRIAL_METRICS)} (and the "
                       "objective's metrics per guidance scale, LoRA strength or img2img strength, e.g. "
                       "objective@guidance=7.5)")
        if o.metric in seen:
            out.append(f"{path}: {o.metric!r} is listed twice")
        good = GOOD_MODES.get(base_metric(o.metric))
        if good is not None and o.mode != good:
            better = "lower" if good == "min" else "higher"
            follows = " (the pruner and the export follow the primary objective's mode)" if i == 0 else ""
            out.append(f"{path.removesuffix('.metric')}.mode: {o.metric!r} is better {better}; set mode: {good}{follows}")
        if o.metric in (*ORACLE_METRICS, *HELDOUT_METRICS) and _eval_oracle(spec) is None:
            out.append(f"{path}: {o.metric!r} comes from the toy world's pixel oracle; set eval.oracle: "
                       "toy_world (built-in toy world only) or optimise a CLIP metric such as objective")
        seen.add(o.metric)
        if o.weights is not None:
            out += _weights_problems(path.removesuffix(".metric") + ".weights", o)
    if _eval_oracle(spec) is not None and not getattr(spec, "trigger_word", None):
        out.append("eval.oracle: the oracle's concept_accuracy reads the trigger prompts; set trigger_word")
    return out


def _weights_problems(path: str, o: ObjectiveSpec) -> list[str]:
    """`objective.weights`, checked by evaluator.metrics.ObjectiveWeights (the scorer's own type)."""
    if o.metric != "objective":
        return [f"{path}: weights only apply to metric objective (the composite), not {o.metric!r}; "
                "remove weights or set metric: objective"]
    try:
        weights = ObjectiveWeights(**o.weights).as_dict()
    except ValidationError as err:
        out = []
        for e in err.errors():
            where = ".".join(str(p) for p in (path, *e["loc"]))
            if e["type"] == "extra_forbidden":
                out.append(f"{where}: unknown objective component; known: {', '.join(OBJECTIVE_COMPONENTS)}")
            elif e["type"] == "greater_than_equal":
                out.append(f"{where}: must be >= 0 (every component is higher-is-better; 0 drops the term), "
                           f"got {e['input']!r}")
            else:
                out.append(f"{where}: {e['msg']}")
        return out
    out = [f"{path}.{k}: must be a finite number, got {v}" for k, v in weights.items() if not math.isfinite(v)]
    if not out and not any(weights.values()):
        out.append(f"{path}: every weight is 0, so the objective has no term; give at least one a weight > 0")
    return out


def _suite_and_lora_scales(spec):
    """The spec's suite (None when absent or invalid: its problems are reported elsewhere) and eval.lora_scales."""
    from evaluator.suites import SuiteError

    ev = _section(spec, "eval", EvalSpec)
    if ev is None:
        return None, None
    try:
        suite = spec.model_copy(update={"eval": ev}).prompt_suite()
    except SuiteError:
        suite = None
    return suite, ev.lora_scales


def _eval_oracle(spec) -> str | None:
    ev = getattr(spec, "eval", None)
    return ev.get("oracle") if isinstance(ev, dict) else getattr(ev, "oracle", None)


def _condition_problems(spec: SweepSpec, params: dict[str, ParamSpace]) -> list[str]:
    out, fixed = [], spec.fixed()
    for name, p in params.items():
        for key, accepted in p.conditions().items():
            path = f"space.{name}.when.{key}"
            if key == name:
                out.append(f"{path}: a field cannot be conditioned on itself")
            elif key in params:
                q = params[key]
                if q.type not in ("choice", "int"):
                    out.append(f"{path}: space.{key} is continuous; condition on a choice or int field")
                    continue
                bad = [v for v in accepted if not q.contains(v)]
                if bad:
                    out.append(f"{path}: {bad[0]!r} is not a value space.{key} can take ({q.grid_values()})")
            elif key in TrainConfig.model_fields:
                current = fixed.get(key, TrainConfig.model_fields[key].default)
                if current not in accepted:
                    out.append(f"{path}: {key} is fixed to {current!r}, so {name} is never searched; "
                               f"search {key} in space or remove the condition")
            else:
                out.append(f"{path}: not a training field; a condition names a field in space or train")
    try:
        search_order(params)
    except ValueError as err:
        out.append(f"space: {err}; remove one of the `when` conditions")
    return out


def _search_problems(spec: SweepSpec, search: SearchSpec, n_objectives: int, params: dict[str, ParamSpace]) -> list[str]:
    out = []
    if search.sampler == "nsga2" and n_objectives < 2:
        out.append("search.sampler: nsga2 is for multi-objective search; give objective as a list of >= 2 "
                   "{metric, mode} entries, or use tpe")
    if search.sampler == "grid":
        size = 1
        for name, p in params.items():
            values = p.grid_values()
            if values is None:
                out.append(f"space.{name}: the grid sampler needs choice or int fields (or uniform with step); "
                           "add step, list the values as a choice, or use sampler: tpe")
            else:
                size *= len(values)
            if p.when:
                out.append(f"space.{name}.when: the grid sampler does not support conditions; remove when or use tpe")
        if not out and search.num_trials > size:
            out.append(f"search.num_trials: {search.num_trials} exceeds the grid's {size} configurations; "
                       f"set num_trials: {size}")
    if search.sampler == "gp" and importlib.util.find_spec("scipy") is None:
        out.append("search.sampler: gp (optuna GPSampler) needs scipy, which is not installed; "
                   "pip install scipy, or use tpe")
    if len(search.initial_configs) > search.num_trials:
        out.append(f"search.initial_configs: {len(search.initial_configs)} configs but num_trials is "
                   f"{search.num_trials}; raise num_trials or drop configs")
    for i, config in enumerate(search.initial_configs):
        for key, value in config.items():
            path = f"search.initial_configs[{i}].{key}"
            if key not in params:
                out.append(f"{path}: not a searched field; searched fields are {', '.join(params) or '(none)'}")
            elif not params[key].contains(value):
                p = params[key]
                where = p.values if p.type == "choice" else f"[{p.low}, {p.high}]"
                out.append(f"{path}: {value!r} is outside space.{key} ({where})")
    return out


def _pruner_problems(spec: SweepSpec, pruner: PrunerSpec, n_objectives: int) -> list[str]:
    if pruner.type == "none":
        return []
    if n_objectives > 1:
        return ["pruner.type: Optuna cannot prune a multi-objective study; set pruner: {type: none} "
                "or use a single objective"]
    if pruner.type == "wilcoxon" and importlib.util.find_spec("scipy") is None:
        return ["pruner.type: wilcoxon (optuna WilcoxonPruner) needs scipy, which is not installed; "
                "pip install scipy, or use median"]
    if pruner.type == "asha":
        from ray.tune.schedulers import ASHAScheduler as cls

        name, reserved = "ray.tune.schedulers.ASHAScheduler", ASHA_RESERVED
    else:
        import optuna

        cls = getattr(optuna.pruners, OPTUNA_PRUNERS[pruner.type])
        name, reserved = f"optuna.pruners.{cls.__name__}", ()
    params = {k: v for k, v in inspect.signature(cls).parameters.items() if k not in reserved}
    out = [
        f"pruner.options.{k}: unknown option of {name}; valid options: {', '.join(params)}"
        for k in pruner.options if k not in params
    ]
    opts = pruner_options(spec)
    out += [f"pruner.options.{k}: required by {name}" for k, v in params.items()
            if v.default is inspect.Parameter.empty and k not in opts]
    if pruner.type == "asha" and "max_t" not in opts:
        out.append("pruner.options.max_t: required with max_train_epochs (a trial's steps depend on the "
                   "dataset); give the longest trial's training steps")
    if not out:
        try:
            extra = {"time_attr": "step", "metric": spec.primary.metric, "mode": spec.primary.mode} if reserved else {}
            cls(**opts, **extra)
        except (AssertionError, ValueError, TypeError) as err:
            out.append(f"pruner.options: {name} rejects {opts}: {err or 'invalid values'}")
    return out


def _resource_problems(resources: ResourcesSpec) -> list[str]:
    return [
        f"resources.{k}: {v} is fractional above 1; Ray takes fractions below 1 or whole numbers"
        for k, v in (("cpus_per_trial", resources.cpus_per_trial), ("gpus_per_trial", resources.gpus_per_trial))
        if v > 1 and v != int(v)
    ]


def _eval_problems(spec: SweepSpec, ev: EvalSpec) -> list[str]:
    if ev.suite is None:
        return [] if ev.prompts else ["eval.prompts: give prompts (or eval.suite) to score the trials on"]
    from evaluator.suites import SuiteError, expand_suite, load_suite, parse_suite

    try:
        suite = parse_suite(ev.suite, "eval.suite") if isinstance(ev.suite, dict) else load_suite(ev.suite)
        expand_suite(suite, getattr(spec, "trigger_word", None), ev.class_word)
    except SuiteError as err:
        return [f"eval.suite: {line}" for line in str(err).splitlines()]
    source = "eval.suite" if isinstance(ev.suite, dict) else f"eval.suite: {ev.suite}"
    return variant_problems(suite, source, _sampling_steps(spec))


def _sampling_steps(spec: SweepSpec) -> int | None:
    """The evaluation's sampling steps (None when the training values do not validate: reported elsewhere)."""
    try:
        return spec.train_config({}).sampling.steps
    except (TrainConfigError, ValidationError, TypeError, AttributeError):
        return None


def _judge_problems(spec: SweepSpec, evaluator: EvaluatorSpec, ev: EvalSpec | None,
                    objectives: list[ObjectiveSpec]) -> list[str]:
    """The optional judges: a metric only with its judge, a judge only with a suite. Their files are
    inputs, checked with the base model and the dataset (`sweeps.trial_plan.input_problems`)."""
    out = []
    single = not isinstance(getattr(spec, "objective", None), list)
    for i, o in enumerate(objectives):
        if o.metric in JUDGES and not getattr(evaluator, JUDGES[o.metric][0]):
            key, what = JUDGES[o.metric]
            out.append(f"{'objective.metric' if single else f'objective[{i}].metric'}: {o.metric!r} comes from an "
                       f"optional judge that is not configured; set evaluator.{key}: <path> ({what}), "
                       "or optimise another metric")
    if ev is not None and ev.suite is None:
        out += [f"evaluator.{key}: the judges score a prompt suite's images; set eval.suite (examples/suites/) "
                f"or remove evaluator.{key}" for key in ("dino", "aesthetic") if getattr(evaluator, key)]
    return out


def _caption_problems(spec: SweepSpec) -> list[str]:
    """`caption:` with the training values it serves (the trigger word, not a DreamBooth dataset)."""
    from trainer.captioning import CaptionConfig
    from trainer.dataset_captions import caption_settings_problems

    caption = getattr(spec, "caption", None)
    if not isinstance(caption, CaptionConfig):
        return []
    try:
        cfg = spec.train_config({k: p.extremes()[0] for k, p in _valid_params(spec).items()})
    except TrainConfigError:
        return []  # already reported
    return [f"{'trigger_word' if key == 'trigger_word' else f'train.{key}'}: {msg}"
            for key, msg in caption_settings_problems(cfg, caption)]


def cross_problems(spec: SweepSpec) -> list[str]:
    """Checks across sections, each run on the sections that validated on their own."""
    params = _valid_params(spec)
    params = {k: p for k, p in params.items() if not p.problems()}
    objectives = _objectives(spec)
    out = _objective_problems(spec, objectives) + _condition_problems(spec, params)
    search, pruner = _section(spec, "search", SearchSpec), _section(spec, "pruner", PrunerSpec)
    resources, ev = _section(spec, "resources", ResourcesSpec), _section(spec, "eval", EvalSpec)
    if search:
        out += _search_problems(spec, search, len(objectives), params)
    if pruner and ev and objectives:
        # The pruner's defaults read eval and objective: use their validated forms.
        view = spec.model_copy(update={"pruner": pruner, "eval": ev, "objective": objectives})
        out += _pruner_problems(view, pruner, len(objectives))
    if resources:
        out += _resource_problems(resources)
    if ev:
        out += _eval_problems(spec, ev) + full_finetune_scale_problems(spec.train, spec.space, ev.lora_scales)
    export = _section(spec, "export", ExportSpec)
    if export and ev:
        out += export_scale_problems(export.scale, ev.lora_scales)
    evaluator = _section(spec, "evaluator", EvaluatorSpec)
    if evaluator:
        out += _judge_problems(spec, evaluator, ev, objectives)
    if evaluator and resources and evaluator.placement.device == "gpu" and resources.gpus_per_trial == 0:
        # A replica asking for a GPU share would only go to GPU nodes, which CPU trials need not have.
        out.append("evaluator.placement.device: gpu, but resources.gpus_per_trial is 0 (the trials hold no GPU); "
                   "use device: cpu or auto, or give the trials GPUs")
    study = _section(spec, "study", StudySpec)
    if study:
        from sweeps.study_storage import storage_problems

        out += storage_problems(spec.model_copy(update={"study": study}))
    return out + _caption_problems(spec)


