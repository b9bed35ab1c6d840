"""The training loop, in plain phases: prepare, setup, step, evaluate (sample), save, restore.

A LoRA by default; `method: full` trains the model's own weights (trainer.full_finetune), and
`use_ema` averages whatever trains (trainer.ema).

Knows nothing of Ray or W&B: callers drive it step by step and read metrics from a callback.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params, compute_snr
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from trainer.cache import ensure_latent_cache, ensure_text_cache
from trainer.config import TARGET_MODULES, TEXT_ENCODER_TARGET_MODULES, SamplingConfig, TrainConfig, TrainConfigError
from trainer.dataset_layouts import Example
from trainer.ema import TrainedWeightsEMA
from trainer.full_finetune import load_trained_weights, setup_full_finetune, trained_parameters, trained_weights
from trainer.images import load_image
from trainer.losses import diffusion_target, per_sample_loss
from trainer.model_loading import SDComponents, load_sd_components
from trainer.preparation import Prepared, default_device, place_base_models, prepare, uses_text_cache
from trainer.samplers import BucketBatchSampler, EpochSampler, bucket_ids
from trainer.text_encoding import encode_prompts
from trainer.train_data import data_settings
from trainer.validation import ValidationLoss

MetricsCallback = Callable[[dict], None]
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run cannot continue."""


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: max_train_epochs x steps per epoch when epochs are set."""
    return cfg.max_train_epochs * steps_per_epoch if cfg.max_train_epochs is not None else cfg.max_train_steps


class LoraTrainer:
    """One run on an SD 1.x UNet (and optionally its text encoder): LoRA layers, or the model's own
    weights with `method: full`. `step()` is one optimizer step.

    Phases: the constructor is cheap (it checks the config against the device); `setup()`
    loads the base model, runs `prepare` (skipped when a `Prepared` is given: then the dataset is
    neither read nor verified and no module is fingerprinted) and builds caches, LoRA layers,
    samplers and optimizer; then `step`/`train`, `sample`/`evaluate`, and `state_dict` /
    `load_state_dict` (trainer.checkpoint) to save and restore. `LoraTrainer.build(...)` is
    construct + setup. `self.cfg` is the config passed in; `self.max_train_steps` is the run's length.
    """

    def __init__(self, cfg: TrainConfig, components: SDComponents | None = None, device: str | None = None,
                 prepared: Prepared | None = None):
        self.cfg = cfg
        self.device = default_device(device)
        _check_device(cfg, self.device)
        if prepared is not None:
            _check_prepared(cfg, prepared)
        self.models = components
        self.prepared = prepared

    @classmethod
    def build(cls, cfg: TrainConfig, components: SDComponents | None = None, device: str | None = None,
              prepared: Prepared | None = None) -> LoraTrainer:
        """A trainer set up and ready to step."""
        trainer = cls(cfg, components, device, prepared)
        trainer.setup()
        return trainer

    # --- setup ----------------------------------------------------------------------------
    def setup(self) -> None:
        """The base model, the prepare phase when no Prepared was given, then caches, LoRA layers,
        data order, RNGs, optimizer, schedule and loss scaler."""
        cfg = self.cfg
        if self.models is None:
            self.models = load_sd_components(cfg.base_model)
        if self.prepared is None:
            self.prepared = prepare(cfg, components=self.models, device=str(self.device))
        else:
            place_base_models(self.models, cfg, self.device)
        self.data = self.prepared.data
        self.target_sizes = self.data.target_sizes(cfg)
        self.latent_cache, self.text_cache = self._setup_caches()
        torch.manual_seed(cfg.seed)  # LoRA init draws from the global RNG
        if cfg.method == "full":
            setup_full_finetune(self.models, cfg)
        else:
            self._setup_lora()
        self.sampler = BucketBatchSampler(bucket_ids(self.data.examples, self.target_sizes), cfg.train_batch_size, cfg.seed)
        self.class_sampler = EpochSampler(len(self.data.class_examples), cfg.seed + 1) if self.data.class_examples else None
        self.steps_per_epoch = math.ceil(self.sampler.batches_per_epoch / cfg.gradient_accumulation_steps)
        self.max_train_steps = total_steps(cfg, self.steps_per_epoch)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.np_rng = np.random.default_rng(cfg.seed)  # flips and random crops
        self.caption_rng = np.random.default_rng([cfg.seed, 1])  # caption dropout
        self.optimizer = self._make_optimizer()
        self.ema = TrainedWeightsEMA(cfg, trained_parameters(self.models, cfg.train_text_encoder)) if cfg.use_ema else None
        self.lr_scheduler = get_scheduler(
            cfg.lr_scheduler, optimizer=self.optimizer, num_warmup_steps=cfg.lr_warmup_steps,
            num_training_steps=self.max_train_steps, num_cycles=cfg.lr_num_cycles, power=cfg.lr_power,
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.mixed_precision == "fp16")
        self.global_step = 0
        self._validation = None  # val_loss's fixed inputs, built on its first call

    def _setup_caches(self):
        """Caches the prepare phase built are found by their keys; one for settings it did not
        prepare (a searched resolution) is built here."""
        cfg, m, p = self.cfg, self.models, self.prepared
        latents = ensure_latent_cache(cfg, m.vae, self.data, p.vae_fingerprint) if cfg.cache_latents else None
        text = None
        if uses_text_cache(cfg):
            text = ensure_text_cache(cfg, m.tokenizer, m.text_encoder, self.data.captions(), cfg.clip_skip,
                                     p.text_encoder_fingerprint)
        return latents, text

    def _setup_lora(self) -> None:
        m, cfg = self.models, self.cfg
        if cfg.mixed_precision != "no" and self.device.type == "cuda":
            m.unet.to(dtype=_DTYPES[cfg.mixed_precision])  # frozen base in half precision saves memory
        lora = dict(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, init_lora_weights="gaussian")
        m.unet.add_adapter(LoraConfig(**lora, target_modules=TARGET_MODULES[cfg.target_modules]))
        modules = [m.unet]
        if cfg.train_text_encoder:
            m.text_encoder.add_adapter(
                LoraConfig(**lora, target_modules=TEXT_ENCODER_TARGET_MODULES[cfg.target_modules]), adapter_name="default"
            )
            modules.append(m.text_encoder)
            m.text_encoder.train()
        cast_training_params(modules, dtype=torch.float32)  # LoRA weights and optimizer state in fp32
        if cfg.gradient_checkpointing:
            m.unet.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                m.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.unet.train()

    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        self.unet_params = [p for p in self.models.unet.parameters() if p.requires_grad]
        self.te_params = [p for p in self.models.text_encoder.parameters() if p.requires_grad] if cfg.train_text_encoder else []
        groups = [{"params": self.unet_params, "lr": cfg.learning_rate}]
        if self.te_params:
            groups.append({"params": self.te_params, "lr": cfg.te_lr})
        kwargs = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        if cfg.optimizer == "adamw8bit":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(groups, **kwargs)
        return torch.optim.AdamW(groups, **kwargs)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return self.unet_params + self.te_params

    def _autocast(self):
        if self.cfg.mixed_precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.cfg.mixed_precision])

    # --- step -----------------------------------------------------------------------------
    def _latents(self, examples: list[Example], flips: list[bool]) -> torch.Tensor:
        """Scaled latents sampled from the VAE's distribution with self.generator, from the cache or
        by encoding the images now; both paths draw the same noise, so losses agree."""
        vae = self.models.vae
        if self.latent_cache is not None:
            moments = [self.latent_cache.moments(e.image_path, f) for e, f in zip(examples, flips)]
            mean = torch.stack([mu for mu, _ in moments]).to(self.device)
            std = torch.stack([s for _, s in moments]).to(self.device)
            sample = torch.randn(mean.shape, generator=self.generator, device=self.device, dtype=mean.dtype)
            latents = mean + std * sample
        else:
            cfg = self.cfg
            pixels = torch.stack([
                load_image(e.image_path, self.target_sizes[e.image_path], cfg.center_crop, f, self.np_rng)
                for e, f in zip(examples, flips)
            ]).to(self.device)
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample(self.generator)
        return latents * vae.config.scaling_factor

    def _cond(self, captions: list[str]) -> torch.Tensor:
        m = self.models
        if self.text_cache is not None:
            return self.text_cache.embeddings(captions).to(self.device)
        if self.cfg.train_text_encoder:
            with self._autocast():
                return encode_prompts(m.tokenizer, m.text_encoder, captions, self.cfg.clip_skip)
        with torch.no_grad():
            return encode_prompts(m.tokenizer, m.text_encoder, captions, self.cfg.clip_skip)

    def _inputs(self, examples: list[Example], dropout: bool) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        flips = [cfg.random_flip and bool(self.np_rng.random() < 0.5) for _ in examples]
        captions = [e.caption for e in examples]
        if dropout and cfg.caption_dropout_rate > 0:
            captions = ["" if self.caption_rng.random() < cfg.caption_dropout_rate else c for c in captions]
        return self._latents(examples, flips), self._cond(captions)

    def _per_sample_loss(self, latents: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        m, cfg = self.models, self.cfg
        noise = torch.randn(latents.shape, generator=self.generator, device=self.device)
        if cfg.noise_offset:
            offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=self.generator, device=self.device)
            noise = noise + cfg.noise_offset * offset
        sched = m.noise_scheduler
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=self.generator, device=self.device)
        noisy = sched.add_noise(latents, noise, t)
        target = diffusion_target(sched, latents, noise, t)
        with self._autocast():
            pred = m.unet(noisy, t, cond).sample
        snr = compute_snr(sched, t) if cfg.snr_gamma is not None else None
        return per_sample_loss(pred, target, snr, cfg.snr_gamma, sched.config.prediction_type)

    def _micro_batch_loss(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Instance loss and (with prior preservation) the prior loss of one micro-batch."""
        batch = [self.data.examples[i] for i in self.sampler.next_batch()]
        latents, cond = self._inputs(batch, dropout=True)
        if self.class_sampler is None:
            return self._per_sample_loss(latents, cond).mean(), None
        classes = [self.data.class_examples[i] for i in self.class_sampler.next_indices(len(batch))]
        c_latents, c_cond = self._inputs(classes, dropout=False)
        if c_latents.shape == latents.shape:  # one forward over both halves, as diffusers' DreamBooth does
            per = self._per_sample_loss(torch.cat([latents, c_latents]), torch.cat([cond, c_cond]))
            return per[: len(batch)].mean(), per[len(batch) :].mean()
        return self._per_sample_loss(latents, cond).mean(), self._per_sample_loss(c_latents, c_cond).mean()

    def step(self) -> dict:
        """One optimizer step over `gradient_accumulation_steps` micro-batches."""
        cfg = self.cfg
        accum = cfg.gradient_accumulation_steps
        start = time.perf_counter()
        # Summed on the device in float64 (as Python floats summed the float32 losses before), so
        # that the step has one host sync.
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        prior_total = torch.zeros_like(total)
        for _ in range(accum):
            loss, prior = self._micro_batch_loss()
            if prior is not None:
                prior_total += prior.detach().double() / accum
                loss = loss + cfg.prior_loss_weight * prior
            loss = loss / accum
            self.scaler.scale(loss).backward()
            total += loss.detach().double()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        loss_value, prior_value, grad_norm_value = torch.stack([total, prior_total, grad_norm.double()]).tolist()
        if not math.isfinite(loss_value):
            raise TrainingDiverged(
                f"loss became {loss_value} at step {self.global_step + 1} (lr {self.lr_scheduler.get_last_lr()[0]:.3g}); "
                "lower the learning rate or enable gradient clipping"
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lrs = self.lr_scheduler.get_last_lr()
        self.lr_scheduler.step()
        self.global_step += 1
        if self.ema is not None:
            self.ema.after_step(self.global_step)
        seconds = time.perf_counter() - start
        metrics = {
            "step": self.global_step,
            "epoch": self.sampler.epoch,
            "loss": loss_value,
            "lr": lrs[0],
            "grad_norm": grad_norm_value,
            "images_per_sec": cfg.train_batch_size * accum / seconds,
        }
        if self.te_params:
            metrics["lr_text_encoder"] = lrs[1]
        if self.class_sampler is not None:
            metrics["prior_loss"] = prior_value
        if self.ema is not None and self.ema.decay is not None:
            metrics["ema_decay"] = self.ema.decay
        return metrics

    def train(self, num_steps: int | None = None, callback: MetricsCallback | None = None) -> list[dict]:
        """Run `num_steps` steps (default: until max_train_steps); returns every step's metrics."""
        remaining = self.max_train_steps - self.global_step
        steps = remaining if num_steps is None else min(num_steps, remaining)
        history = []
        for _ in range(steps):
            metrics = self.step()
            history.append(metrics)
            if callback:
                callback(metrics)
        return history

    # --- evaluate -------------------------------------------------------------------------
    def eval_weights(self):
        """A context with the weights that evaluation and export use: the EMA's when on."""
        return self.ema.averaged() if self.ema is not None else contextlib.nullcontext()

    def sample(self, prompts: list[str], seeds: list[int], sampling: SamplingConfig | None = None) -> np.ndarray:
        """Text-to-image at `sampling` (default: the config's), NHWC uint8."""
        from trainer.sampling import sample_images

        with self._sampling_mode():
            return sample_images(self.models, prompts, seeds, self.cfg.clip_skip, self.cfg.resolution,
                                 sampling or self.cfg.sampling)

    def sample_img2img(self, prompts: list[str], seeds: list[int], init_images: list[np.ndarray],
                       strength: float) -> np.ndarray:
        """Image-to-image from `init_images` (uint8 HWC, fitted to the resolution here) at `strength`."""
        from trainer.sampling import fit_image, sample_img2img

        fitted = [fit_image(im, self.cfg.resolution) for im in init_images]
        with self._sampling_mode():
            return sample_img2img(self.models, prompts, seeds, fitted, strength, self.cfg.clip_skip, self.cfg.sampling)

    @contextlib.contextmanager
    def _sampling_mode(self):
        """Eval mode (and autocast on CUDA) while sampling; training mode again afterwards."""
        m = self.models
        m.unet.eval()
        m.text_encoder.eval()
        try:
            with self.eval_weights(), self._autocast() if self.device.type == "cuda" else contextlib.nullcontext():
                yield
        finally:
            m.unet.train()
            if self.cfg.train_text_encoder:
                m.text_encoder.train()

    def validation_loss(self) -> float:
        """val_loss (trainer.validation): the mean diffusion loss over the validation images at fixed
        timesteps, noise and latent samples; eval mode, no gradients, no draw from the training RNGs."""
        if self._validation is None:
            self._validation = ValidationLoss(self)
        with self.eval_weights():
            return self._validation()

    def evaluate(self) -> np.ndarray:
        """The validation images of cfg.sampling (prompts at their seeds), NHWC uint8."""
        s = self.cfg.sampling
        return self.sample(s.prompts, s.seeds or list(range(len(s.prompts))))

    # --- save / restore -------------------------------------------------------------------
    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """peft-format UNet LoRA weights (keys without the adapter name)."""
        if self.cfg.method != "lora":
            raise TypeError(f"method {self.cfg.method!r} trains no LoRA; use trained_weights()")
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.models.unet).items()}

    def text_encoder_lora_state_dict(self) -> dict[str, torch.Tensor]:
        """peft-format text-encoder LoRA weights; empty when the text encoder is not trained."""
        if not self.cfg.train_text_encoder:
            return {}
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.models.text_encoder).items()}

    def trained_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """What a `method: full` run trains ({"unet": ..., "text_encoder": ...}, trainer.full_finetune)."""
        return trained_weights(self.models, self.cfg.train_text_encoder)

    def _weights_state(self) -> dict:
        if self.cfg.method == "full":  # only the trained modules: the VAE and a frozen text encoder never change
            return {"full": self.trained_weights()}
        return {"lora": self.lora_state_dict(), "text_encoder_lora": self.text_encoder_lora_state_dict()}

    def state_dict(self) -> dict:
        """Everything that decides the rest of the run: weights, EMA, optimizer, schedule, RNGs, data order."""
        return {
            **self._weights_state(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "grad_scaler": self.scaler.state_dict(),
            "global_step": self.global_step,
            "sampler": self.sampler.state_dict(),
            "class_sampler": self.class_sampler.state_dict() if self.class_sampler else None,
            "generator": self.generator.get_state(),
            "np_rng": self.np_rng.bit_generator.state,
            "caption_rng": self.caption_rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }

    def load_state_dict(self, state: dict) -> None:
        if self.cfg.method == "full":
            load_trained_weights(self.models, self.cfg.train_text_encoder, state["full"])
        else:
            set_peft_model_state_dict(self.models.unet, state["lora"])
            if self.cfg.train_text_encoder:
                set_peft_model_state_dict(self.models.text_encoder, state["text_encoder_lora"])
        if (state.get("ema") is None) != (self.ema is None):
            raise ValueError(f"the state was saved with use_ema {state.get('ema') is not None}, this trainer has "
                             f"use_ema {self.ema is not None}")
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if state.get("grad_scaler"):  # {} (None in older checkpoints) without a loss scaler
            self.scaler.load_state_dict(state["grad_scaler"])
        self.global_step = state["global_step"]
        self.sampler.load_state_dict(state["sampler"])
        if self.class_sampler is not None:
            self.class_sampler.load_state_dict(state["class_sampler"])
        self.generator.set_state(state["generator"])
        self.np_rng.bit_generator.state = state["np_rng"]
        self.caption_rng.bit_generator.state = state["caption_rng"]
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)


def _check_device(cfg: TrainConfig, device: torch.device) -> None:
    if cfg.mixed_precision == "fp16" and device.type != "cuda":
        raise TrainConfigError(f"mixed_precision: fp16 needs a CUDA device (this run is on {device}); use bf16 or no")
    if cfg.optimizer == "adamw8bit" and device.type != "cuda":
        raise TrainConfigError(f"optimizer: adamw8bit (bitsandbytes) needs a CUDA device (this run is on {device}); use adamw")


def _check_prepared(cfg: TrainConfig, prepared: Prepared) -> None:
    """A Prepared read for other data settings would train on the wrong examples."""
    wanted = data_settings(cfg)
    differ = sorted(k for k, v in wanted.items() if prepared.data.settings.get(k) != v)
    if differ:
        raise TrainConfigError(
            "the prepared data was read for other data settings ("
            + ", ".join(f"{k}: {prepared.data.settings.get(k)!r} there, {wanted[k]!r} here" for k in differ)
            + "); prepare this config instead"
        )
