"""The loss math: min-SNR weights by hand, and the v-prediction target against the scheduler."""

import pytest
import torch
from diffusers import DDPMScheduler

from trainer.losses import diffusion_target, per_sample_loss

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def test_min_snr_weighting_matches_hand_computation():
    pred = torch.tensor([[[[1.0]]], [[[3.0]]]])
    target = torch.zeros_like(pred)
    snr = torch.tensor([2.0, 10.0])
    # per-sample MSE 1 and 9; epsilon weights min(snr, 5)/snr = 1 and 0.5
    assert per_sample_loss(pred, target, snr, 5.0, "epsilon").mean().item() == pytest.approx((1 * 1 + 9 * 0.5) / 2)
    # v-prediction weights min(snr, 5)/(snr + 1) = 2/3 and 5/11
    assert per_sample_loss(pred, target, snr, 5.0, "v_prediction").mean().item() == pytest.approx((2 / 3 + 9 * 5 / 11) / 2)
    assert torch.equal(per_sample_loss(pred, target, None, None, "epsilon"), torch.tensor([1.0, 9.0]))


def test_v_prediction_target_is_scheduler_velocity():
    sched = DDPMScheduler(**SD15, prediction_type="v_prediction")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    got = diffusion_target(sched, x0, noise, t)
    torch.testing.assert_close(got, sched.get_velocity(x0, noise, t))
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(got, abar.sqrt() * noise - (1 - abar).sqrt() * x0)  # Salimans & Ho 2022
    eps = DDPMScheduler(**SD15, prediction_type="epsilon")
    assert diffusion_target(eps, x0, noise, t) is noise
    with pytest.raises(ValueError, match="sample"):
        diffusion_target(DDPMScheduler(**SD15, prediction_type="sample"), x0, noise, t)
