"""SweepSpec: the typed, validated form of `search.yaml`.

Every problem is reported at once, each with its YAML path and what to do, before Ray starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainer.config import TrainConfig, TrainConfigError, build_train_config, format_validation_error


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
    values: list[Any] | None = Field(None, description="For choice: the candidates.")
    when: dict[str, Any] | None = Field(
        None, description="Condition: search this field only when other fields take these values, "
        "e.g. {lr_scheduler: cosine_with_restarts}; otherwise the fixed/default value is used."
    )

    def problems(self) -> list[str]:
        if self.type == "choice":
            return [] if self.values else ["values: a choice needs a non-empty list, e.g. values: [4, 8, 16]"]
        out = []
        if self.low is None or self.high is None:
            return [f"low/high: {self.type} needs both low and high"]
        if self.low >= self.high:
            out.append(f"low: must be < high ({self.low} >= {self.high})")
        if (self.type == "loguniform" or self.log) and self.low <= 0:
            out.append(f"low: must be > 0 for a log scale (got {self.low})")
        return out

    def extremes(self) -> list[Any]:
        """Values that must all be valid TrainConfig values."""
        if self.type == "choice":
            return list(self.values or [])
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


class EvalSpec(_Strict):
    """What each trial is scored on."""

    interval: int = Field(50, ge=1, description="Training steps between evaluations.")
    suite: str | None = Field(None, description="Prompt-suite YAML (see evaluator); replaces `prompts` when given.")
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

    def eval_prompts(self) -> tuple[list[str], list[int]]:
        """Every (prompt, seed) pair, prompts with the trigger word filled in."""
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
    problems += _space_problems(spec) + _train_problems(spec)
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
    return parse_spec(apply_overrides(data, list(overrides)), str(path))
