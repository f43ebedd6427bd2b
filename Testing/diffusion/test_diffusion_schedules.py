"""Spec C.9 oracle 7 (sigmoid schedule) and QC3 (registered in MONAI's NoiseSchedules)."""

from __future__ import annotations

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, NoiseSchedules

from medgen.diffusion import SIGMOID_SCHEDULE, sigmoid_alphas_cumprod


def test_sigmoid_schedule_reference_values():
    alphas_cumprod = sigmoid_alphas_cumprod(1000)
    betas = DDPMScheduler(num_train_timesteps=1000, schedule=SIGMOID_SCHEDULE).betas

    assert alphas_cumprod.shape == (1000,) and alphas_cumprod.dtype == torch.float32
    assert abs(alphas_cumprod[0].item() - 0.99970) < 1e-5
    assert abs(alphas_cumprod[499].item() - 0.5) < 1e-6
    assert abs(alphas_cumprod[999].item() - 3.0e-7) < 0.05e-7
    assert abs(betas[0].item() - 3.0e-4) < 0.05e-4
    assert abs(betas[499].item() - 3.3e-3) < 0.05e-3
    assert abs(betas[999].item() - 0.999) < 1e-6
    assert bool((betas[1:] >= betas[:-1]).all()), "beta must be monotone non-decreasing"


def test_sigmoid_schedule_registered_in_monai_noise_schedules():
    assert SIGMOID_SCHEDULE in NoiseSchedules
    for scheduler in (
        DDPMScheduler(num_train_timesteps=1000, schedule=SIGMOID_SCHEDULE),
        DDIMScheduler(num_train_timesteps=1000, schedule=SIGMOID_SCHEDULE),
    ):
        assert torch.equal(scheduler.alphas_cumprod, sigmoid_alphas_cumprod(1000))
        torch.testing.assert_close(torch.cumprod(1 - scheduler.betas.double(), 0).float(), scheduler.alphas_cumprod)
    # schedule_args reach the function: a different temperature gives a different table
    tempered = DDPMScheduler(num_train_timesteps=1000, schedule=SIGMOID_SCHEDULE, tau=0.5)
    assert torch.equal(tempered.alphas_cumprod, sigmoid_alphas_cumprod(1000, tau=0.5))
    assert not torch.equal(tempered.alphas_cumprod, sigmoid_alphas_cumprod(1000))
