"""TrainConfig: every knob of one LoRA training run, typed and validated at the edge."""

from __future__ import annotations

import importlib.util
import types
import typing
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError, PydanticUndefined

# Names that diffusers.optimization.get_scheduler accepts (diffusers 0.42).
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)

# Which UNet modules get LoRA layers. "attention" is what diffusers' LoRA script targets;
# "attention_mlp" adds the transformer feed-forward, "all" adds the ResNet convs (kohya LoCon-like).
TARGET_MODULES = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "attention_mlp": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"],
    "all": [
        "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
        "conv1", "conv2", "conv_shortcut", "conv", "time_emb_proj",
    ],
}
# The same choice for the CLIP text encoder (kohya trains attention + MLP of every layer).
TEXT_ENCODER_TARGET_MODULES = {
    "attention": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "attention_mlp": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "all": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}


class TrainConfigError(ValueError):
    """A TrainConfig that cannot be built; the message lists every problem with its field.

    `problems` holds (dotted field path, message) pairs, e.g. ("sampling.seeds", "..."), so that
    callers (the sweep's spec checks) place each under their own YAML path.
    """

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.problems = problems or []


def _located(model: str, problems: list[tuple[str, str, object]]) -> ValidationError:
    """Cross-field problems as a ValidationError whose entries carry their fields' locations, as
    pydantic's own field errors do (a model validator may raise it; pydantic nests the locations)."""
    return ValidationError.from_exception_data(model, [
        InitErrorDetails(type=PydanticCustomError("combination", "{msg}", {"msg": msg}), loc=(field,), input=value)
        for field, msg, value in problems])


class SamplingConfig(BaseModel):
    """How evaluation images are sampled from the LoRA (fixed seeds make trials comparable)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(8, ge=1, le=200, description="Denoising steps per image.")
    guidance_scale: float = Field(5.0, ge=1.0, le=30.0, description="Classifier-free guidance scale.")
    sampler: Literal["ddim", "euler", "euler_a", "dpmpp_2m", "pndm"] = Field(
        "ddim", description="Sampling scheduler used for evaluation images."
    )
    negative_prompt: str = Field("", description="Negative prompt for every sample.")
    prompts: list[str] = Field(
        default_factory=list, description="Validation prompts that LoraTrainer.evaluate() renders (empty = none)."
    )
    seeds: list[int] = Field(
        default_factory=list, description="One seed per validation prompt; empty means seeds 0, 1, 2, ..."
    )

    @model_validator(mode="after")
    def _check_seeds(self) -> SamplingConfig:
        if self.seeds and len(self.seeds) != len(self.prompts):
            raise _located("SamplingConfig", [("seeds", f"{len(self.seeds)} seeds for {len(self.prompts)} prompts; "
                                               "give one per prompt or none", self.seeds)])
        return self


class ClassSamplingConfig(BaseModel):
    """How prior-preservation class images are generated: regularisation images want the base
    model at its usual quality (diffusers' DreamBooth script: the pipeline's defaults, 50 steps
    at guidance 7.5), not the evaluation's few steps."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(50, ge=1, le=200, description="Denoising steps per class image.")
    guidance_scale: float = Field(7.5, ge=1.0, le=30.0, description="Classifier-free guidance scale.")
    sampler: Literal["ddim", "euler", "euler_a", "dpmpp_2m", "pndm"] = Field(
        "pndm", description="Scheduler of the class images (pndm: SD 1.x pipelines' own default).")
    negative_prompt: str = Field("", description="Negative prompt of every class image.")
    batch_size: int = Field(4, ge=1, le=256, description="Class images per sampling batch.")


class TrainConfig(BaseModel):
    """One training run (a LoRA, or a full fine-tune with `method: full`). Units are given per field;
    defaults suit SD 1.5 at 512 px."""

    model_config = ConfigDict(extra="forbid")

    # --- model and data -------------------------------------------------------------------
    base_model: str = Field(
        description="Hub id, local diffusers folder, single-file .safetensors, or builtin:tiny-sd."
    )
    dataset: str = Field(
        description="Dataset folder (kohya `<repeats>_<trigger> <class>/`, imagefolder with metadata.jsonl, "
        "or a DreamBooth instance folder) or builtin:demo."
    )
    dataset_type: Literal["auto", "kohya", "imagefolder", "dreambooth"] = Field(
        "auto",
        description="Dataset layout; auto: metadata.jsonl -> imagefolder, `<n>_<name>/` subfolders -> kohya, "
        "images directly in the folder -> dreambooth.",
    )
    trigger_word: str | None = Field(None, description="Trigger word the captions carry (metadata only).")
    num_repeats: int | None = Field(
        None, ge=1, le=10_000, description="Repeats per image per epoch; overrides kohya folder prefixes. None: "
        "the kohya prefix, or 1 for other layouts."
    )
    caption_dropout_rate: float = Field(
        0.0, ge=0, lt=1, description="Probability (0-1) that an instance caption is replaced by '' (seeded)."
    )
    on_bad_image: Literal["fail", "skip"] = Field(
        "fail", description="An unreadable/corrupt image or a missing caption: fail, or skip it with a warning."
    )
    resolution: int = Field(512, ge=8, le=4096, description="Training image side in pixels (multiple of 8).")
    center_crop: bool = Field(True, description="Center crop (True) or random crop (False) after resizing.")
    random_flip: bool = Field(False, description="Horizontal flip with probability 0.5.")
    seed: int = Field(0, ge=0, description="Seed for LoRA init, data order, noise and timesteps.")

    # --- DreamBooth / prior preservation ----------------------------------------------------
    instance_prompt: str | None = Field(
        None, description="Caption of every instance image of a dreambooth dataset (e.g. 'a photo of sks dog')."
    )
    with_prior_preservation: bool = Field(False, description="Add the prior-preservation loss on class images.")
    class_prompt: str | None = Field(None, description="Caption of the class images (e.g. 'a photo of a dog').")
    class_data_dir: str | None = Field(
        None, description="Folder of class images; missing ones are generated with the base model and kept."
    )
    num_class_images: int = Field(100, ge=1, le=100_000, description="Class images wanted in class_data_dir.")
    prior_loss_weight: float = Field(1.0, ge=0, description="Weight of the prior-preservation loss.")
    class_sampling: ClassSamplingConfig = Field(default_factory=ClassSamplingConfig)

    # --- aspect-ratio bucketing -------------------------------------------------------------
    enable_bucket: bool = Field(False, description="kohya-style aspect-ratio buckets instead of square crops.")
    min_bucket_reso: int = Field(256, ge=8, description="Smallest bucket side in pixels.")
    max_bucket_reso: int = Field(1024, ge=8, description="Largest bucket side in pixels.")
    bucket_reso_steps: int = Field(64, ge=8, description="Bucket sides are multiples of this (pixels).")

    # --- schedule ---------------------------------------------------------------------------
    max_train_steps: int = Field(
        100, ge=1, description="Optimizer steps to train; ignored when max_train_epochs is set (then leave it unset)."
    )
    max_train_epochs: int | None = Field(
        None, ge=1, description="Train this many epochs (passes over the repeated data) instead of max_train_steps."
    )
    train_batch_size: int = Field(1, ge=1, le=256, description="Images per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=128, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(
        1e-4, gt=0, le=1.0, description="UNet learning rate (its LoRA, or its own weights with method full; "
        "1e-5 is usual for a full fine-tune).")
    text_encoder_lr: float | None = Field(
        None, gt=0, le=1.0, description="Text-encoder learning rate (LoRA or full); None = learning_rate."
    )
    optimizer: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="adamw (torch) or adamw8bit (bitsandbytes, CUDA only)."
    )
    lr_scheduler: Literal[LR_SCHEDULERS] = Field("constant", description="diffusers get_scheduler name.")
    lr_warmup_steps: int = Field(0, ge=0, description="Warmup in optimizer steps.")
    lr_num_cycles: int = Field(1, ge=1, description="Cycles for cosine_with_restarts (restarts only when > 1).")
    lr_power: float = Field(1.0, gt=0, description="Power of the polynomial schedule.")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay (decoupled, per step).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW first-moment decay.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW second-moment decay.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW denominator epsilon.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm (L2 over all LoRA params).")
    checkpoint_interval: int = Field(0, ge=0, description="Steps between checkpoints; 0 = off.")

    # --- method -----------------------------------------------------------------------------
    method: Literal["lora", "full"] = Field(
        "lora", description="lora: train LoRA layers on the frozen model; full: train the UNet's own weights "
        "(and the text encoder's with train_text_encoder), as diffusers' train_text_to_image does. The LoRA "
        "fields (rank, alpha, lora_dropout, target_modules) are unused with full.",
    )

    # --- EMA of the trained weights (trainer.ema: diffusers' EMAModel) ---------------------------
    use_ema: bool = Field(
        False, description="Keep an exponential moving average of the trained weights; evaluation, val_loss and "
        "export then use the averaged weights.")
    ema_decay: float = Field(0.9999, gt=0, lt=1, description="EMA's largest decay per update (EMAModel decay).")
    ema_min_decay: float = Field(0.0, ge=0, lt=1, description="EMA's smallest decay per update.")
    ema_update_after_step: int = Field(
        0, ge=0, description="EMA updates that only copy the weights before averaging starts (EMAModel "
        "update_after_step; counted in EMA updates).")
    ema_warmup: bool = Field(
        False, description="Decay 1 - (1 + n)^-ema_warmup_power after n EMA updates (EMAModel use_ema_warmup); "
        "otherwise (1 + n) / (10 + n); either capped at ema_decay.")
    ema_warmup_power: float = Field(2 / 3, gt=0, le=1, description="Power of the EMA warm-up (2/3 for long runs, "
                                    "3/4 for short ones).")
    ema_update_interval: int = Field(
        1, ge=1, description="Optimizer steps between EMA updates (1 = every step; larger saves time on big models).")

    # --- LoRA -------------------------------------------------------------------------------
    rank: int = Field(4, ge=1, le=1024, description="LoRA rank (network dim).")
    alpha: float | None = Field(
        None, gt=0, description="LoRA alpha; scale = alpha / rank. None means alpha = rank (scale 1)."
    )
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability on the LoRA input.")
    target_modules: Literal["attention", "attention_mlp", "all"] = Field(
        "attention", description="attention: q/k/v/out; attention_mlp: + feed-forward; all: + ResNet convs."
    )
    train_text_encoder: bool = Field(
        False, description="Also train the CLIP text encoder: its LoRA layers, or (method full) its own weights.")

    # --- conditioning and loss --------------------------------------------------------------
    clip_skip: int = Field(1, ge=1, le=12, description="AUTOMATIC1111 convention: 1 = off, 2 = penultimate layer.")
    noise_offset: float = Field(0.0, ge=0, le=1, description="Offset noise strength (0 = off).")
    snr_gamma: float | None = Field(None, gt=0, description="Min-SNR weighting gamma (5.0 is common); None = off.")
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="Override the scheduler's prediction type; None keeps the model's."
    )

    # --- speed and memory -------------------------------------------------------------------
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="Autocast dtype of the forward pass; fp16 needs CUDA (with a loss scaler)."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (less memory, slower).")
    attention: Literal["sdpa", "default"] = Field(
        "sdpa", description="UNet attention: torch scaled_dot_product_attention, or diffusers' plain processor."
    )
    cache_latents: bool = Field(
        True, description="Encode each image (and flip variant) with the VAE once, on disk, shared by trials."
    )
    cache_text_embeddings: bool = Field(
        True, description="Encode each caption once while the text encoder is frozen (unused when it trains)."
    )
    cache_dir: str | None = Field(None, description="Where caches live; None = <LORASWEEP_CACHE>/train_cache.")

    # --- validation loss (trainer.validation) ----------------------------------------------
    validation_fraction: float = Field(
        0.0, ge=0, lt=1, description="Fraction (0-1) of the unique instance images held out of training for "
        "val_loss (at least one image when > 0; chosen by a hash of each image's path, the same in every trial). "
        "0 (default): no image is held out and val_loss is measured on the training images themselves, since "
        "LoRA datasets are often too small (5-30 images) to give up any.",
    )
    validation_dir: str | None = Field(
        None, description="A folder of validation images (read with the dataset's layout rules; never trained on) "
        "instead of validation_fraction; None = none.",
    )
    validation_timesteps: int = Field(
        4, ge=1, le=100, description="Fixed timesteps, spread evenly over the noise schedule, at which val_loss "
        "is measured for every validation image (cost: images x timesteps UNet forwards).",
    )
    validation_seed: int = Field(
        0, ge=0, description="Seed of val_loss's fixed noise and latent samples (not the training seed, so that "
        "trials of every seed are measured alike).",
    )

    # --- evaluation samples -----------------------------------------------------------------
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainConfig:
        problems = self.combination_problems()
        if problems:
            raise _located("TrainConfig", [(field, msg, getattr(self, field)) for field, msg in problems])
        return self

    def combination_problems(self) -> list[tuple[str, str]]:
        """(field, message) for each value that is valid alone but not with the others."""
        out = []
        if self.resolution % 8:
            out.append(("resolution", f"{self.resolution} is not a multiple of 8 (VAE downsamples by 8)"))
        if self.max_train_epochs is None and self.lr_warmup_steps >= self.max_train_steps and self.lr_scheduler != "constant":
            out.append(("lr_warmup_steps", "must be smaller than max_train_steps"))
        if self.max_train_epochs is not None and "max_train_steps" in self.model_fields_set:
            out.append(("max_train_epochs", "set either max_train_epochs or max_train_steps, not both"))
        if self.with_prior_preservation:
            if not self.class_prompt:
                out.append(("class_prompt", "required when with_prior_preservation is true (e.g. 'a photo of a dog')"))
            if not self.class_data_dir:
                out.append(("class_data_dir", "required when with_prior_preservation is true (a folder, may be empty)"))
        if self.validation_fraction > 0 and self.validation_dir:
            out.append(("validation_dir", "set either validation_dir or validation_fraction, not both"))
        if self.dataset_type == "dreambooth" and not self.instance_prompt:
            out.append(("instance_prompt", "required for dataset_type dreambooth (e.g. 'a photo of sks dog')"))
        if self.enable_bucket:
            out += self._bucket_problems()
        if self.cache_latents and not self.center_crop:
            out.append(("cache_latents", "random crops (center_crop: false) cannot be cached; set center_crop: true "
                                         "or cache_latents: false"))
        if self.use_ema and self.ema_min_decay > self.ema_decay:
            out.append(("ema_min_decay", f"{self.ema_min_decay} exceeds ema_decay {self.ema_decay}"))
        if self.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
            out.append(("optimizer", "adamw8bit needs bitsandbytes (CUDA only): `pip install bitsandbytes`, or use adamw"))
        return out

    def _bucket_problems(self) -> list[tuple[str, str]]:
        out, step = [], self.bucket_reso_steps
        if step % 8:
            out.append(("bucket_reso_steps", f"{step} is not a multiple of 8"))
        if self.min_bucket_reso > self.resolution:
            out.append(("min_bucket_reso", f"{self.min_bucket_reso} exceeds resolution {self.resolution}"))
        if self.max_bucket_reso < self.resolution:
            out.append(("max_bucket_reso", f"{self.max_bucket_reso} is below resolution {self.resolution}"))
        for name, value in (("min_bucket_reso", self.min_bucket_reso), ("max_bucket_reso", self.max_bucket_reso)):
            if value % step:
                out.append((name, f"{value} is not a multiple of bucket_reso_steps ({step})"))
        return out

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)

    @property
    def te_lr(self) -> float:
        """Text-encoder learning rate (falls back to learning_rate)."""
        return self.text_encoder_lr if self.text_encoder_lr is not None else self.learning_rate


def validation_problems(err: ValidationError) -> list[tuple[str, str]]:
    """(dotted path, message) for each of pydantic's errors, from its own locations."""
    out = []
    for e in err.errors():
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        out.append((".".join(str(p) for p in e["loc"]), msg))
    return out


def format_validation_error(err: ValidationError, prefix: str = "") -> list[str]:
    """One line per problem, each naming its dotted path (`train.rank: ...`)."""
    return [f"{'.'.join(p for p in (prefix, path) if p) or '(top level)'}: {msg}" for path, msg in validation_problems(err)]


def train_config_problems(values: dict) -> list[tuple[str, str]]:
    """Every problem of these TrainConfig values at once: the fields that fail alone, and the
    combinations of the others (pydantic skips the cross-field checks when a field fails, so they
    are run again without the failing fields; a combination naming one of those is left out)."""
    try:
        TrainConfig(**values)
        return []
    except ValidationError as err:
        problems = validation_problems(err)
    failing = {path.split(".")[0] for path, _ in problems}
    rest = {k: v for k, v in values.items() if k not in failing}
    if rest != values:
        try:
            TrainConfig(**rest)
        except ValidationError as err:
            problems += [p for p in validation_problems(err) if p[0].split(".")[0] not in failing and p not in problems]
    return problems


def build_train_config(values: dict) -> TrainConfig:
    """Build a TrainConfig or raise TrainConfigError listing every problem."""
    try:
        return TrainConfig(**values)
    except ValidationError:
        problems = train_config_problems(values)
    lines = [f"{path or '(top level)'}: {msg}" for path, msg in problems]
    raise TrainConfigError("invalid training config:\n  " + "\n  ".join(lines), problems)


def _type_name(annotation) -> str:
    """`int | None`, `auto|kohya|...` for a Literal, `list[str]`: as a user writes the value."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _field_rows(model_cls: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    rows = []
    for name, info in model_cls.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += _field_rows(annotation, f"{prefix}{name}.")  # nested section: its own fields
            continue
        if info.default is PydanticUndefined and info.default_factory is None:
            default = "(required)"
        else:
            default = repr(info.default_factory() if info.default_factory else info.default)
        rows.append((prefix + name, _type_name(annotation), default, info.description or ""))
    return rows


def describe_fields(model_cls: type[BaseModel]) -> str:
    """Every field of a config model, one per line: dotted name, type, default, description.
    Fields of a nested config model are listed as `<section>.<name>`."""
    rows = _field_rows(model_cls)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    header = ("field", "type", "default", "description")
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  " + header[3]]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3] for r in rows]
    return "\n".join(line.rstrip() for line in lines)
