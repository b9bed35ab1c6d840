"""TrainConfig: every knob of one LoRA training run, typed and validated at the edge."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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


class TrainConfigError(ValueError):
    """A TrainConfig that cannot be built; the message lists every problem with its field."""


class SamplingConfig(BaseModel):
    """How evaluation images are sampled from the LoRA (fixed seeds make trials comparable)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(8, ge=1, le=200, description="Denoising steps per image.")
    guidance_scale: float = Field(5.0, ge=1.0, le=30.0, description="Classifier-free guidance scale.")
    sampler: Literal["ddim", "euler", "euler_a", "dpmpp_2m", "pndm"] = Field(
        "ddim", description="Sampling scheduler used for evaluation images."
    )
    negative_prompt: str = Field("", description="Negative prompt for every sample.")


class TrainConfig(BaseModel):
    """One LoRA training run. Units are given per field; defaults suit SD 1.5 at 512 px."""

    model_config = ConfigDict(extra="forbid")

    # --- model and data -------------------------------------------------------------------
    base_model: str = Field(
        description="Hub id, local diffusers folder, single-file .safetensors, or builtin:tiny-sd."
    )
    dataset: str = Field(description="Dataset folder (kohya `<repeats>_<trigger> <class>/` layout) or builtin:demo.")
    trigger_word: str | None = Field(None, description="Trigger word the captions carry (metadata only).")
    resolution: int = Field(512, ge=8, le=4096, description="Training image side in pixels (multiple of 8).")
    center_crop: bool = Field(True, description="Center crop (True) or random crop (False) after resizing.")
    random_flip: bool = Field(False, description="Horizontal flip with probability 0.5.")
    seed: int = Field(0, ge=0, description="Seed for LoRA init, data order, noise and timesteps.")

    # --- schedule ---------------------------------------------------------------------------
    max_train_steps: int = Field(100, ge=1, description="Optimizer steps to train.")
    train_batch_size: int = Field(1, ge=1, le=256, description="Images per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=128, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(1e-4, gt=0, le=1.0, description="UNet LoRA learning rate.")
    lr_scheduler: Literal[LR_SCHEDULERS] = Field("constant", description="diffusers get_scheduler name.")
    lr_warmup_steps: int = Field(0, ge=0, description="Warmup in optimizer steps.")
    lr_num_cycles: int = Field(1, ge=1, description="Cycles for cosine_with_restarts (restarts only when > 1).")
    lr_power: float = Field(1.0, gt=0, description="Power of the polynomial schedule.")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay.")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")

    # --- LoRA -------------------------------------------------------------------------------
    rank: int = Field(4, ge=1, le=1024, description="LoRA rank (network dim).")
    alpha: float | None = Field(
        None, gt=0, description="LoRA alpha; scale = alpha / rank. None means alpha = rank (scale 1)."
    )
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Literal["attention", "attention_mlp", "all"] = Field("attention")

    # --- conditioning and loss --------------------------------------------------------------
    clip_skip: int = Field(1, ge=1, le=12, description="AUTOMATIC1111 convention: 1 = off, 2 = penultimate layer.")
    noise_offset: float = Field(0.0, ge=0, le=1, description="Offset noise strength (0 = off).")
    snr_gamma: float | None = Field(None, gt=0, description="Min-SNR weighting gamma (5.0 is common); None = off.")
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="Override the scheduler's prediction type; None keeps the model's."
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no")

    # --- evaluation samples -----------------------------------------------------------------
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)

    @model_validator(mode="after")
    def _check_combinations(self) -> "TrainConfig":
        problems = []
        if self.resolution % 8:
            problems.append(f"resolution: {self.resolution} is not a multiple of 8 (VAE downsamples by 8)")
        if self.lr_warmup_steps >= self.max_train_steps and self.lr_scheduler != "constant":
            problems.append("lr_warmup_steps: must be smaller than max_train_steps")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


def format_validation_error(err: ValidationError, prefix: str = "") -> list[str]:
    """One line per problem, each naming its dotted path (`train.rank: ...`)."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        path = ".".join(p for p in (prefix, loc) if p)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
        lines.append(f"{path or '(top level)'}: {msg}")
    return lines


def build_train_config(values: dict) -> TrainConfig:
    """Build a TrainConfig or raise TrainConfigError listing every problem."""
    try:
        return TrainConfig(**values)
    except ValidationError as err:
        raise TrainConfigError("invalid training config:\n  " + "\n  ".join(format_validation_error(err))) from None
