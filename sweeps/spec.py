"""SweepSpec: the typed, validated form of `search.yaml`.

Every problem is reported at once, each with its YAML path and what to do, before Ray starts.
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainer.config import TrainConfig, TrainConfigError, build_train_config, format_validation_error

# Metrics the trainable reports and an objective may name: the trainable's own (`loss`) and the
# evaluator's. Extend this when the evaluator reports a new metric.
KNOWN_METRICS = (
    "clip_score", "clip_score_concept", "clip_score_new_setting", "clip_score_no_concept", "clip_i",
    "prior_preservation", "trigger_effect", "objective", "loss",
    # evaluator.score.suite_metrics: clip_score_<kind> for each kind of prompt in the suite
    "clip_score_natural", "clip_score_trigger_on", "clip_score_trigger_off",
)
# Optuna pruner per `pruner.type` (options are checked against these classes' signatures).
OPTUNA_PRUNERS = {
    "median": "MedianPruner", "percentile": "PercentilePruner", "successive_halving": "SuccessiveHalvingPruner",
    "hyperband": "HyperbandPruner", "wilcoxon": "WilcoxonPruner",
}
# Options the project sets itself for ASHA (it reads the trainable's `step`, the spec's objective).
ASHA_RESERVED = ("time_attr", "metric", "mode")
_SCALAR = (str, int, float, bool, type(None))


class SpecError(ValueError):
    """An unusable sweep spec; `problems` holds one `path: message` line each."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        super().__init__(f"{source}: {len(problems)} problem(s) in the sweep spec:\n  " + "\n  ".join(problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParamSpace(_Strict):
    """One searched TrainConfig field."""

    type: Literal["loguniform", "uniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    log: bool = Field(False, description="For int: sample on a log scale.")
    step: float | None = Field(None, gt=0, description="For uniform/int: discretize (e.g. 0.05); needed by grid.")
    values: list[Any] | None = Field(None, description="For choice: the candidates.")
    when: dict[str, Any] | None = Field(
        None, description="Condition: search this field only when other fields take these values, "
        "e.g. {lr_scheduler: cosine_with_restarts} (a list means any of them); otherwise the "
        "fixed/default value is used."
    )

    def problems(self) -> list[str]:
        if self.type == "choice":
            if not self.values:
                return ["values: a choice needs a non-empty list, e.g. values: [4, 8, 16]"]
            bad = [v for v in self.values if not isinstance(v, _SCALAR)]
            return [f"values: {bad[0]!r} is not a scalar; Optuna choices are strings, numbers, booleans or null"] if bad else []
        out = []
        if self.low is None or self.high is None:
            return [f"low/high: {self.type} needs both low and high"]
        if self.low >= self.high:
            out.append(f"low: must be < high ({self.low} >= {self.high})")
        if (self.type == "loguniform" or self.log) and self.low <= 0:
            out.append(f"low: must be > 0 for a log scale (got {self.low})")
        if self.step is not None and (self.type == "loguniform" or self.log):
            out.append("step: Optuna cannot discretize a log scale; drop step or use a choice")
        if self.type == "int" and self.step is not None and self.step != int(self.step):
            out.append(f"step: must be a whole number for int (got {self.step})")
        return out

    def extremes(self) -> list[Any]:
        """Values that must all be valid TrainConfig values."""
        if self.type == "choice":
            return list(self.values or [])
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def grid_values(self) -> list[Any] | None:
        """Every value a grid visits, or None when the range is continuous."""
        if self.type == "choice":
            return list(self.values or [])
        if self.type == "int" and not self.log:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.type == "uniform" and self.step:
            n = int(round((self.high - self.low) / self.step))
            return [round(self.low + i * self.step, 12) for i in range(n + 1)]
        return None

    def contains(self, value: Any) -> bool:
        if self.type == "choice":
            return value in (self.values or [])
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.type == "int" and value != int(value):
            return False
        return self.low <= value <= self.high

    def conditions(self) -> dict[str, list[Any]]:
        """`when` with every value as a list of accepted values."""
        return {k: (v if isinstance(v, list) else [v]) for k, v in (self.when or {}).items()}


class EvalSpec(_Strict):
    """What each trial is scored on."""

    interval: int = Field(50, ge=1, description="Training steps between evaluations.")
    suite: str | dict[str, Any] | None = Field(
        None, description="Prompt suite (evaluator.suites): a YAML path (relative to the spec file) or the "
        "suite inline; replaces `prompts` when given."
    )
    prompts: list[str] = Field(default_factory=list, description="Prompts; `{trigger}` is replaced by the trigger word.")
    seeds: list[int] = Field([0, 1], min_length=1, description="Each prompt is sampled once per seed.")
    class_word: str | None = Field(None, description="Fills `{class}` in prompts (e.g. `outfit`, `dog`).")


class EvaluatorSpec(_Strict):
    model: str = Field("ViT-L-14-quickgelu", description="open_clip model name, or builtin:tiny-clip.")
    pretrained: str | None = Field("openai", description="open_clip pretrained tag or local checkpoint path.")


class ObjectiveSpec(_Strict):
    metric: str = "clip_score"
    mode: Literal["max", "min"] = "max"


class SearchSpec(_Strict):
    sampler: Literal["tpe", "random", "grid", "gp", "nsga2"] = Field(
        "tpe", description="Optuna sampler; tpe is multivariate with constant liar for parallel trials."
    )
    num_trials: int = Field(8, ge=1)
    max_concurrent: int = Field(2, ge=1)
    seed: int = 0
    initial_configs: list[dict[str, Any]] = Field(
        default_factory=list, description="Configs evaluated first (e.g. known-good settings)."
    )


class PrunerSpec(_Strict):
    type: Literal["none", "median", "percentile", "successive_halving", "hyperband", "wilcoxon", "asha"] = "none"
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the pruner.")


class WandbSpec(_Strict):
    enabled: bool = False
    project: str = "lorasweep"
    entity: str | None = None
    mode: Literal["offline", "online"] = Field(
        "offline", description="online also needs WANDB_API_KEY in the environment (never in the spec)."
    )


class TrackingSpec(_Strict):
    wandb: WandbSpec = Field(default_factory=WandbSpec)


class ExportSpec(_Strict):
    top_k: int = Field(1, ge=1, description="How many of the best LoRAs to export.")
    formats: list[Literal["kohya", "diffusers"]] = Field(["kohya", "diffusers"], min_length=1)


class FailureSpec(_Strict):
    max_failures: int = Field(2, ge=0, description="Retries of a trial whose worker died (resumes from its checkpoint).")


class ResourcesSpec(_Strict):
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)


class SweepSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Sweep id; names the output folder.")
    storage: str = Field("runs", description="Folder or URI (s3://, gs://) where trials, the study and the export go.")
    base_model: str
    dataset: str
    trigger_word: str | None = None
    train: dict[str, Any] = Field(default_factory=dict, description="Fixed TrainConfig values.")
    space: dict[str, Any] = Field(default_factory=dict, description="Searched TrainConfig fields.")
    eval: EvalSpec
    evaluator: EvaluatorSpec = Field(default_factory=EvaluatorSpec)
    objective: ObjectiveSpec | list[ObjectiveSpec] = Field(default_factory=ObjectiveSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    failure: FailureSpec = Field(default_factory=FailureSpec)

    @property
    def objectives(self) -> list[ObjectiveSpec]:
        return self.objective if isinstance(self.objective, list) else [self.objective]

    @property
    def primary(self) -> ObjectiveSpec:
        """The objective that ranks trials for export and pruning (the first one)."""
        return self.objectives[0]

    def searched(self) -> dict[str, ParamSpace]:
        return {k: ParamSpace(**v) for k, v in self.space.items() if isinstance(v, dict)}

    def fixed(self) -> dict[str, Any]:
        """TrainConfig values shared by every trial (train + scalar entries of space)."""
        values = {"base_model": self.base_model, "dataset": self.dataset, "trigger_word": self.trigger_word}
        values.update(self.train)
        values.update({k: v for k, v in self.space.items() if not isinstance(v, dict)})
        return values

    def train_config(self, params: dict[str, Any]) -> TrainConfig:
        return build_train_config({**self.fixed(), **params})

    def prompt_suite(self):
        """The eval suite (evaluator.suites.PromptSuite), or None when `eval.prompts` are used."""
        if self.eval.suite is None:
            return None
        from evaluator.suites import load_suite, parse_suite

        if isinstance(self.eval.suite, dict):
            return parse_suite(self.eval.suite, "eval.suite")
        return load_suite(self.eval.suite)

    def eval_prompts(self) -> tuple[list[str], list[int]]:
        """Every (prompt, seed) pair, prompts with the trigger word filled in."""
        suite = self.prompt_suite()
        if suite is not None:
            from evaluator.suites import expand_suite

            items = expand_suite(suite, self.trigger_word, self.eval.class_word)
            return [it.prompt for it in items], [it.seed for it in items]
        trigger, cls = self.trigger_word or "", self.eval.class_word or ""
        pairs = [
            (p.replace("{trigger}", trigger).replace("{class}", cls).strip(" ,"), s)
            for p in self.eval.prompts
            for s in self.eval.seeds
        ]
        return [p for p, _ in pairs], [s for _, s in pairs]

    @property
    def is_remote(self) -> bool:
        return "://" in self.storage

    @property
    def storage_uri(self) -> str:
        """Where Ray Tune keeps this sweep's experiment (a local absolute path or a URI)."""
        if self.is_remote:
            return self.storage.rstrip("/")
        return str(Path(self.storage).expanduser().resolve())

    @property
    def output_dir(self) -> Path:
        """Local folder of this sweep (exports, study); for remote storage a local mirror under ./runs."""
        if self.is_remote:
            return Path("runs").resolve() / self.name
        return Path(self.storage_uri) / self.name


def _space_problems(spec: SweepSpec) -> list[str]:
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
                lines = [ln.strip() for ln in str(err).splitlines()[1:] if ln.strip().startswith(f"{name}:")]
                problems += [f"space.{name}: value {value!r} is invalid ({ln.split(':', 1)[1].strip()})" for ln in lines]
    return problems


def _train_problems(spec: SweepSpec) -> list[str]:
    """Fixed values checked with each searched field at its first extreme."""
    sample = {k: p.extremes()[0] for k, p in _valid_params(spec).items()}
    try:
        spec.train_config(sample)
    except TrainConfigError as err:
        return [
            f"train.{ln.strip()}" for ln in str(err).splitlines()[1:] if ln.strip().split(":")[0].split(".")[0] not in sample
        ]
    return []


def _valid_params(spec: SweepSpec) -> dict[str, ParamSpace]:
    out = {}
    for name, raw in spec.space.items():
        if isinstance(raw, dict) and name in TrainConfig.model_fields:
            try:
                out[name] = ParamSpace(**raw)
            except ValidationError:
                pass
    return out


def search_order(params: dict[str, ParamSpace]) -> list[str]:
    """Searched fields with every condition's field before the fields it gates; raises on a cycle."""
    order: list[str] = []
    pending = dict(params)
    while pending:
        ready = [n for n, p in pending.items() if not any(k in pending and k != n for k in p.conditions())]
        if not ready:
            raise ValueError(f"conditions form a cycle among {', '.join(sorted(pending))}")
        for n in ready:
            order.append(n)
            del pending[n]
    return order


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
    """The pruner's keyword arguments: the spec's options over the project's defaults, whose
    resources are training steps (the trainable reports `step`): first rung = one eval interval."""
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
        if o.metric not in KNOWN_METRICS:
            out.append(f"{path}: unknown metric {o.metric!r}; trials report {', '.join(KNOWN_METRICS)}")
        if o.metric in seen:
            out.append(f"{path}: {o.metric!r} is listed twice")
        seen.add(o.metric)
    return out


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
    return []


def _cross_problems(spec: SweepSpec) -> list[str]:
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
        out += _eval_problems(spec, ev)
    return out


def parse_spec(data: dict, source: str = "<spec>") -> SweepSpec:
    if not isinstance(data, dict):
        raise SpecError(source, ["(top level): expected a mapping of keys such as name, base_model, dataset, space"])
    problems: list[str] = []
    try:
        spec = SweepSpec(**data)
    except ValidationError as err:
        problems += format_validation_error(err)
        # Still check the space and the training values, so every problem is reported at once.
        spec = SweepSpec.model_construct(**data)
        if not all(isinstance(getattr(spec, k, None), dict) for k in ("train", "space")):
            raise SpecError(source, problems) from None
    problems += _space_problems(spec) + _train_problems(spec) + _cross_problems(spec)
    if problems:
        raise SpecError(source, problems)
    return spec


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`--set train.max_train_steps=10` style overrides; values are parsed as YAML scalars."""
    for item in overrides:
        if "=" not in item:
            raise SpecError("--set", [f"{item}: expected key=value, e.g. search.num_trials=4"])
        key, value = item.split("=", 1)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return data


def load_spec(path: str | Path, overrides: list[str] = ()) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), ["file not found; pass --space pointing at a sweep YAML such as examples/demo.yaml"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SpecError(str(path), [f"not valid YAML: {err}"]) from None
    data = apply_overrides(data, list(overrides))
    suite = (data.get("eval") or {}).get("suite") if isinstance(data.get("eval"), dict) else None
    if isinstance(suite, str) and not Path(suite).expanduser().is_absolute():
        # A suite path is relative to the spec file, so the spec works from any folder.
        data["eval"]["suite"] = str((path.parent / suite).resolve())
    return parse_spec(data, str(path))
