"""The parameter-memory estimate: SD 1.5's known sizes, and LoRA counts equal to what peft really adds."""

from peft import LoraConfig

from trainer.config import TARGET_MODULES, build_train_config
from trainer.memory_estimate import estimate_memory
from trainer.model_loading import load_sd_components

SD15_UNET_PARAMS = 859_520_964  # the UNet of v1-5-pruned-emaonly
SD15_ALL_PARAMS = SD15_UNET_PARAMS + 123_060_480 + 83_653_863  # + CLIP ViT-L/14 text encoder + VAE


def _cfg(**over):
    return build_train_config({"base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5", "dataset": "d", **over})


def test_sd15_full_finetune_with_ema_and_adamw():
    est = estimate_memory(_cfg(method="full", use_ema=True))
    assert est.trained_params == SD15_UNET_PARAMS
    assert est.weights == 4 * SD15_ALL_PARAMS
    assert (est.gradients, est.optimizer, est.ema) == (4 * SD15_UNET_PARAMS, 8 * SD15_UNET_PARAMS, 4 * SD15_UNET_PARAMS)
    assert 17.9e9 < est.total < 18.1e9
    assert estimate_memory(_cfg(method="full")).ema == 0


def test_lora_counts_what_peft_adds_to_the_tiny_unet(tiny_sd_dir):
    for targets, rank in (("attention", 4), ("all", 2)):
        unet = load_sd_components(str(tiny_sd_dir)).unet
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGET_MODULES[targets]))
        real = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
        est = estimate_memory(build_train_config({"base_model": str(tiny_sd_dir), "dataset": "d", "rank": rank,
                                                  "target_modules": targets}))
        assert est.trained_params == real, targets


def test_mixed_precision_halves_a_loras_frozen_unet_only_on_cuda():
    lora = estimate_memory(_cfg(mixed_precision="bf16"))
    assert estimate_memory(_cfg(mixed_precision="bf16"), on_cuda=False).weights - lora.weights == 2 * SD15_UNET_PARAMS
    full = _cfg(method="full", mixed_precision="bf16")
    assert estimate_memory(full).weights == estimate_memory(full, on_cuda=False).weights  # fp32 master weights


def test_adamw8bit_quarters_the_optimizer_states():
    cfg = _cfg(method="full")
    eight = cfg.model_copy(update={"optimizer": "adamw8bit"})  # bitsandbytes need not be installed to estimate
    assert estimate_memory(eight).optimizer * 4 == estimate_memory(cfg).optimizer
