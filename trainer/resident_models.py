"""Resident base models: a trial worker keeps its loaded base model across the trials it runs.

Ray Tune reuses a trial's worker process for the next trial (`reuse_actors=True`); without this
module every trial would still load the whole pipeline again (for SD 1.5 a 3.4 GB UNet, the VAE
and the text encoder) and move it to the device. Here the last base model a process used stays
loaded (one per process, so memory is bounded), keyed by what identifies it: the resolved
location, the weights' hash and file identity, the device, the dtype the UNet is held in and the
attention implementation. The next trial whose key matches gets the same modules back after a
complete reset: the previous LoRA layers removed (peft), gradient checkpointing off, the input
grad hook of a checkpointed text encoder removed, gradients dropped, everything frozen and in
eval mode, a fresh noise scheduler from the model's own config, then placed on the device with
the new config's attention processors and prediction type. The optimizer and every RNG belong
to the previous trial's trainer and go with it.

Reuse is refused (the model is loaded again) when the key differs, and when the base weights
were changed in any way by the trial that used them (a full fine-tune, an in-place cast, a
replaced parameter): every parameter's and buffer's identity, storage and version counter are
recorded when the model is handed out, and compared when it is asked for again. A reset that
leaves a module tree, a hook or a flag other than the freshly loaded model's also reloads.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from diffusers.utils import recurse_remove_peft_layers
from peft.tuners.tuners_utils import BaseTunerLayer

from trainer.config import TrainConfig
from trainer.model_loading import SDComponents, base_model_weights_file, load_sd_components, resolve_base_model
from trainer.preparation import Prepared, place_base_models

log = logging.getLogger(__name__)
_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ResidentKey:
    """What identifies a loaded base model: two configs with equal keys can share one."""

    kind: str  # folder | single_file | hub (trainer.model_loading.resolve_base_model)
    source: str  # resolved: absolute path, or hub id
    sha256: str | None  # the driver's hash of the weights file (Prepared.base_model_sha256)
    weights_file: tuple[int, int] | None  # (size, mtime_ns) of that file now: replaced on disk since
    device: str
    unet_dtype: str  # the dtype the frozen UNet is held in (half under mixed precision on CUDA)
    attention: str  # TrainConfig.attention


def unet_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """The dtype LoraTrainer holds the frozen UNet in: half precision under mixed precision on CUDA
    (trainer.loop._setup_lora), float32 otherwise. The text encoder and VAE stay float32."""
    if cfg.mixed_precision != "no" and device.type == "cuda":
        return _HALF[cfg.mixed_precision]
    return torch.float32


def resident_key(cfg: TrainConfig, device: torch.device, prepared: Prepared | None = None) -> ResidentKey:
    """What `cfg` needs loaded. Training the text encoder needs no other base model: it is held in
    float32 trained or frozen, and the LoRA layers a reset removes are all that training adds.
    The attention processors are set per trial anyway (place_base_models); a config with another
    attention implementation still gets a freshly loaded model, so that nothing a processor keeps
    can carry over (sweeps rarely search it, so this costs little)."""
    kind, source = resolve_base_model(cfg.base_model)
    weights = base_model_weights_file(cfg.base_model)
    stat = Path(weights).stat() if weights is not None else None
    return ResidentKey(
        kind=kind, source=source, sha256=prepared.base_model_sha256 if prepared is not None else None,
        weights_file=(stat.st_size, stat.st_mtime_ns) if stat else None, device=str(device),
        unet_dtype=str(unet_dtype(cfg, device)).removeprefix("torch."), attention=cfg.attention,
    )


@dataclass(frozen=True)
class Acquired:
    """The base model a trial gets, and how: warm (reused) or loaded, and why it was (re)loaded."""

    components: SDComponents
    warm: bool
    reload_reason: str | None  # None when warm; "first use" or what differed


@dataclass
class _Resident:
    key: ResidentKey
    components: SDComponents
    scheduler_config: dict  # the model's own noise schedule: a trial may change prediction_type
    structure: tuple  # module tree, hooks and flags of the freshly loaded model
    weights: tuple = ()  # identity of every tensor as handed out (weights_identity)


def _modules(c: SDComponents) -> dict[str, torch.nn.Module]:
    return {"unet": c.unet, "vae": c.vae, "text_encoder": c.text_encoder}


def weights_identity(components: SDComponents) -> tuple:
    """Every parameter's and buffer's (name, object, storage, version counter, dtype, device): any
    in-place update (an optimizer step), cast or replacement of a base tensor changes it."""
    out = []
    for part, module in _modules(components).items():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            out.append((part, name, id(t), t.data_ptr(), t._version, t.dtype, str(t.device)))
    return tuple(out)


# transformers installs these on a text encoder's layers at its first call with
# output_hidden_states (clip skip > 1), once for the model's life; they do nothing unless a call
# asks for hidden states, so they belong to the model, not to a trial.
_OUTPUT_CAPTURING = "transformers.utils.output_capturing"


def structure(components: SDComponents) -> tuple:
    """What a reset must bring back: module classes, hooks, train flags, checkpointing flags, grads."""
    out = []
    for part, module in _modules(components).items():
        for name, m in module.named_modules():
            hooks = [*m._forward_hooks.values(), *m._forward_pre_hooks.values(), *m._backward_hooks.values()]
            hooks = sum(getattr(h, "__module__", None) != _OUTPUT_CAPTURING for h in hooks)
            out.append((part, name, type(m).__name__, hooks, m.training, bool(getattr(m, "gradient_checkpointing", False))))
        out.append((part, any(p.requires_grad or p.grad is not None for p in module.parameters())))
        out.append((part, bool(getattr(module, "_hf_peft_config_loaded", False)), hasattr(module, "peft_config")))
    return tuple(out)


def reset_components(components: SDComponents, scheduler_config: dict) -> SDComponents:
    """The previous trial's adapters and training state removed; a fresh noise scheduler."""
    te, unet = components.text_encoder, components.unet
    if hasattr(te, "_require_grads_hook"):  # gradient checkpointing with peft registers it
        te.disable_input_require_grads()
    te.activation_checkpointing_disable()
    unet.disable_gradient_checkpointing()
    for module in (unet, te):
        _remove_peft_layers(module)
    for module in _modules(components).values():
        module.requires_grad_(False)
        module.eval()
        for p in module.parameters():
            p.grad = None
    return dataclasses.replace(components, noise_scheduler=DDPMScheduler.from_config(scheduler_config))


def _remove_peft_layers(module: torch.nn.Module) -> None:
    """Every peft wrapper replaced by the layer it wrapped, and the adapter configs dropped (as
    diffusers' `unload_lora` does; transformers' `delete_adapter` would leave the wrappers)."""
    if any(isinstance(m, BaseTunerLayer) for m in module.modules()):
        recurse_remove_peft_layers(module)
    if hasattr(module, "peft_config"):
        del module.peft_config
    if getattr(module, "_hf_peft_config_loaded", False):
        module._hf_peft_config_loaded = False


class ResidentModels:
    """This process's resident base model (at most one: the last used)."""

    def __init__(self) -> None:
        self._resident: _Resident | None = None

    def acquire(self, cfg: TrainConfig, device: torch.device, prepared: Prepared | None = None) -> Acquired:
        """The base model for `cfg` on `device`, frozen, adapter-free and placed for `cfg`."""
        key = resident_key(cfg, device, prepared)
        components, reason = self._reuse(key)
        if components is None:
            self.release()
            components = load_sd_components(cfg.base_model)
            config = dict(components.noise_scheduler.config)
            self._resident = _Resident(key, components, config, structure(components))
            log.info("base model %s loaded (%s)", key.source, reason)
        place_base_models(components, cfg, device)
        components.unet.to(dtype=unet_dtype(cfg, device))
        self._resident.components = components
        self._resident.weights = weights_identity(components)
        return Acquired(components, warm=reason is None, reload_reason=reason)

    def _reuse(self, key: ResidentKey) -> tuple[SDComponents | None, str | None]:
        """The reset resident model and None, or None and why it cannot be reused."""
        old = self._resident
        if old is None:
            return None, "first use"
        if old.key != key:
            differ = [f.name for f in dataclasses.fields(key) if getattr(key, f.name) != getattr(old.key, f.name)]
            return None, f"{', '.join(differ)} differ"
        try:
            components = reset_components(old.components, old.scheduler_config)
        except Exception as err:  # the trial still runs, on a model loaded again
            return None, f"the reset failed ({type(err).__name__}: {err})"
        if weights_identity(components) != old.weights:
            return None, "the previous trial modified the base weights"
        if structure(components) != old.structure:
            return None, "the previous trial left state that a reset does not remove"
        return components, None

    def release(self) -> None:
        """Drop the resident model and give its memory back (a worker ending, another model next)."""
        if self._resident is None:
            return
        self._resident = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def key(self) -> ResidentKey | None:
        return self._resident.key if self._resident else None


# This process's resident model: a Ray trial worker is one process running one trial at a time.
WORKER = ResidentModels()


def acquire(cfg: TrainConfig, device: torch.device, prepared: Prepared | None = None) -> Acquired:
    return WORKER.acquire(cfg, device, prepared)
