"""The sweep spec's schema: the typed form of `search.yaml` (pydantic models, unknown keys refused).

Checks that span fields and sections live in `sweeps.spec_checks`; reading a file and gathering
every problem at once in `sweeps.spec`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from evaluator.defaults import DEFAULT_MODEL, DEFAULT_PRETRAINED
from evaluator.metrics import ObjectiveWeights
from evaluator.suites import distinct, expand_suite, load_suite, parse_suite
from evaluator.variant_metrics import canonical_name
from trainer.captioning import CaptionConfig
from trainer.config import TrainConfig, build_train_config

_SCALAR = (str, int, float, bool, type(None))


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


class GroundTruthSpec(_Strict):
    """Held-out (caption, truth image) pairs (evaluator.ground_truth): every evaluation samples each
    caption once at `seed` and scores the images against the truth (LPIPS, FD/KID/CMMD on CLIP
    features, CLIP-T); the base model's scores come once per sweep as the reference row (base_gt_*)."""

    folder: str = Field(description="An imagefolder of truth images with metadata.jsonl (file_name, text): a test "
                        "split, or a folder of its own; relative to the working directory. builtin:demo-test: the "
                        "toy world's held-out pictures of the demo concept.")
    seed: int = Field(0, ge=0, description="The one seed of every caption's image.")
    lpips_net: Literal["alex", "vgg", "squeeze"] = Field("alex", description="LPIPS backbone.")
    lpips_weights: str | None = Field(
        None, description="The backbone's torchvision weights file (e.g. alexnet-owt-7be5be79.pth); None: torch's "
        "hub cache (<torch hub dir>/checkpoints/), where torchvision's download puts it; builtin:random: the "
        "package's random backbone at a fixed seed (uncalibrated distances: the toy world and tests only).")


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
    ground_truth: GroundTruthSpec | None = Field(None, description="Held-out pairs to score against (see GroundTruthSpec).")
    oracle: Literal["toy_world"] | None = Field(
        None, description="`toy_world`: also score every evaluation with the toy world's exact pixel oracle "
        "(concept_accuracy, concept_color_rate, prior_accuracy). Only for the built-in toy world: real "
        "sweeps have no oracle.")
    lora_scales: list[float] | None = Field(
        None, min_length=1, description="Sample every evaluation at each of these LoRA strengths (peft adapter "
        "scale, in (0, 1]); metrics per strength (`objective@lora_scale=0.85`) and their mean; the export records "
        "the best strength. None: strength 1 only.")

    @field_validator("lora_scales")
    @classmethod
    def _strengths(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return v
        bad = [w for w in v if not 0 < w <= 1]
        if bad:
            raise ValueError(f"LoRA strength {bad[0]} is outside (0, 1]: 1 is the LoRA as trained, 0 the base model")
        return distinct(v, "lora_scales")


class EvaluatorPlacementSpec(_Strict):
    """Where the evaluator's replicas run: one on every node that can run a trial (never a node that
    cannot, such as a `CPU: 0` head), also on nodes that join while the sweep runs."""

    device: Literal["auto", "gpu", "cpu"] = Field(
        "auto", description="gpu: each replica holds gpu_fraction of a GPU beside the node's trials and runs CLIP "
        "there; cpu: it runs on the node's CPUs; auto: gpu when trials use GPUs and a GPU keeps room for the "
        "replica beside its trials (gpus_per_trial < 1, e.g. 0.9 or 0.45), else cpu.")
    gpu_fraction: float = Field(0.1, gt=0, lt=1, description="Share of one GPU each replica holds with device gpu.")
    cpus: float = Field(
        0.0, ge=0, description="CPUs each replica holds. 0 (default): it computes in short bursts between "
        "trainings, and a held CPU would idle most of the time and hold back a trial.")
    torch_threads: int = Field(1, ge=1, description="The replica's intra-op threads (CPU device).")
    local_wait_s: float = Field(
        60.0, ge=0, description="How long a trial waits for its own node's replica (a node that just joined "
        "gets one within seconds) before it uses another node's, with a log line saying so.")


class EvaluatorSpec(_Strict):
    model: str = Field(DEFAULT_MODEL, description="open_clip model name, or builtin:tiny-clip.")
    pretrained: str | None = Field(DEFAULT_PRETRAINED, description="open_clip pretrained tag or local checkpoint path.")
    dino: str | None = Field(
        None, description="Optional judge: a local Hugging Face folder (config.json + model.safetensors) of a DINO "
        "ViTModel (e.g. facebook/dino-vits16) or a Dinov2Model; every evaluation then reports dino_i, DreamBooth's "
        "DINO subject fidelity (evaluator.judge_metrics).")
    aesthetic: str | None = Field(
        None, description="Optional judge: a LAION aesthetic head file (.pth or .safetensors: the improved-aesthetic-"
        "predictor MLP or the original linear head) made for this CLIP model's embeddings; every evaluation then "
        "reports aesthetic, the mean predicted score of the prompt images.")
    placement: EvaluatorPlacementSpec = Field(default_factory=EvaluatorPlacementSpec)

    def judge_paths(self) -> dict[str, str | None]:
        """{"dino", "aesthetic"}: each configured judge's path made absolute (relative to the working
        directory, as base_model), so that a Ray worker started elsewhere finds it."""
        return {k: str(Path(v).expanduser().resolve()) if v else None
                for k, v in (("dino", self.dino), ("aesthetic", self.aesthetic))}


class ObjectiveSpec(_Strict):
    metric: str = Field("clip_score", description="A reported metric; `objective@guidance=7.5`, `objective@lora_scale="
                        "0.85` or `img2img_clip_i@strength=0.65` names one at a single value (evaluator.variant_metrics).")
    mode: Literal["max", "min"] = "max"
    weights: dict[str, Any] | None = Field(
        None, description="With metric `objective`: the weight of each component (clip_score, clip_i, "
        "prior_preservation, trigger_effect; >= 0, 0 drops the term); a component not given keeps its "
        "default (evaluator.metrics.DEFAULT_OBJECTIVE_WEIGHTS). Checked by evaluator.metrics.ObjectiveWeights.")

    @field_validator("metric")
    @classmethod
    def _as_reported(cls, v: str) -> str:
        return canonical_name(v)  # `objective@lora_scale=1.0` is reported as `objective@lora_scale=1`


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
    formats: list[Literal["kohya", "diffusers"]] = Field(
        ["kohya", "diffusers"], min_length=1, description="LoRA trials: the kohya file (UIs) and diffusers' file. "
        "Full fine-tunes (method full): always model.safetensors, the single-file checkpoint UIs load; "
        "with diffusers also model/, a diffusers pipeline folder.")
    scale: float | Literal["best"] = Field(
        1.0, description="The strength baked into the exported LoRA files (their up weights x scale): 1 = as trained; "
        "`best` = the best of eval.lora_scales (sweeps.export_strength).")

    @field_validator("scale")
    @classmethod
    def _finite_positive(cls, v: float | str) -> float | str:
        if v != "best" and not (0 < v < float("inf")):
            raise ValueError(f"export scale {v} must be a finite number > 0, or best")
        return v


class StudySpec(_Strict):
    storage: str = Field(
        "journal", description="Where the Optuna study lives: `journal` (a journal file in the sweep's storage, written "
        "through when that is an object store) or an Optuna RDB URL without a password (sqlite:///study.db, "
        "postgresql://user@host/db; PGPASSWORD or ~/.pgpass).")


class FailureSpec(_Strict):
    max_failures: int = Field(2, ge=0, description="Retries of a trial whose worker died (resumes from its checkpoint).")


class ResourcesSpec(_Strict):
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    gpu_memory_gb: float | None = Field(
        None, gt=0, description="Memory of one GPU in GB, for --dry-run's memory check (a trial's share is "
        "gpus_per_trial x this); None: this machine's first GPU, or 24 (A10G/3090 class) without one.")
    start_timeout_s: float = Field(
        300.0, gt=0, description="On a cluster: stop the sweep when no trial has started after this many "
        "seconds (no node offers a trial's resources and the autoscaler added none).")


class SweepSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Sweep id; names the output folder.")
    storage: str = Field("runs", description="Folder or URI (s3://, gs://) where trials, the study and the export go.")
    base_model: str
    dataset: str
    trigger_word: str | None = None
    caption: CaptionConfig | None = Field(
        None, description="Caption the dataset's images that have none with BLIP (trainer.captioning), once, "
        "before any trial: `caption: {model: <hub id or local folder>}`; needs trigger_word.")
    train: dict[str, Any] = Field(default_factory=dict, description="Fixed TrainConfig values.")
    space: dict[str, Any] = Field(default_factory=dict, description="Searched TrainConfig fields.")
    eval: EvalSpec
    evaluator: EvaluatorSpec = Field(default_factory=EvaluatorSpec)
    objective: ObjectiveSpec | list[ObjectiveSpec] = Field(default_factory=ObjectiveSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    study: StudySpec = Field(default_factory=StudySpec)
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

    def objective_weights(self) -> dict[str, float] | None:
        """Every component's weight of the composite `objective` metric, when the spec sets them."""
        given = [o.weights for o in self.objectives if o.metric == "objective" and o.weights is not None]
        return ObjectiveWeights(**given[0]).as_dict() if given else None

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
        if isinstance(self.eval.suite, dict):
            return parse_suite(self.eval.suite, "eval.suite")
        return load_suite(self.eval.suite)

    def eval_prompts(self) -> tuple[list[str], list[int]]:
        """Every (prompt, seed) pair, prompts with the trigger word filled in."""
        suite = self.prompt_suite()
        if suite is not None:
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
