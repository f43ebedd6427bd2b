"""The denoising training objective shared by the latent DDPM and the ControlNet families."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from monai.networks.schedulers import Scheduler

from medgen.diffusion.sampling import Denoiser


def noise_prediction_loss(
    denoise: Denoiser,
    scheduler: Scheduler,
    x0: torch.Tensor,
    *,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.mse_loss,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One Monte-Carlo term of the DDPM objective: noise ``x0`` to a uniform random t and score the prediction.

    The target follows ``scheduler.prediction_type``: the noise (``epsilon``), ``x0`` (``sample``) or the
    velocity (``v_prediction``).

    Args:
        denoise: ``denoise(x_t, t)``, e.g. ``unet_denoiser(model, context=...)``; called under the
            trainer's autocast.
        scheduler: the training scheduler (``num_train_timesteps``, schedule, ``prediction_type``).
        x0: clean samples ``(B, C, D, H, W)`` in the model's data range (DIFF-3 latents: [-1, 1]).
        loss: ``loss(prediction, target)``, mean-reduced so gradient accumulation averages correctly
            (DIFF-3: ``F.l1_loss``; MRGen: ``F.mse_loss``).
        generator: source of t and the noise; None draws from torch's global RNG (what the trainer
            saves and restores on resume).

    Returns:
        scalar loss tensor.
    """
    x0 = x0.float()
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    t = torch.randint(0, scheduler.num_train_timesteps, (x0.shape[0],), generator=generator, device=x0.device)
    x_t = scheduler.add_noise(x0, noise, t)
    prediction_type = getattr(scheduler, "prediction_type", "epsilon")
    if prediction_type == "sample":
        target = x0
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(x0, noise, t)
    else:
        target = noise
    return loss(denoise(x_t, t).float(), target)
