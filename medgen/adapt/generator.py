"""Fine-tuning a pretrained 3D DDPM generator with a PEFT method (the TenVOO paper's setting), and sampling it.

The generator is a MONAI ``DiffusionModelUNet`` predicting noise; training minimises the MSE between
true and predicted noise at uniform random timesteps (``medgen.diffusion.noise_prediction_loss``) on
the shared loop (AMP on GPU, EMA off by default, checkpoints with exact resume, cancellation).
Volumes are scaled to [-1, 1] from the [0, 1] range of the user's (normalised) data.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDPMScheduler

from medgen.diffusion import TrainConfig, noise_prediction_loss, sample, train_diffusion, unet_denoiser
from medgen.errors import BadInputError
from medgen.progress import Reporter


@dataclasses.dataclass
class GeneratorFinetuneConfig:
    """Settings of generator fine-tuning.

    Args:
        steps: optimiser steps.
        batch_size: volumes per step.
        lr: Adam learning rate.
        num_train_timesteps: T of the pretrained model's linear-beta schedule.
        amp: bf16 autocast on CUDA.
        checkpoint_every: steps between checkpoints.
        seed: data order and noise.
    """

    steps: int = 200
    batch_size: int = 1
    lr: float = 1e-4
    num_train_timesteps: int = 1000
    amp: bool = True
    checkpoint_every: int = 50
    seed: int = 0


def training_scheduler(num_train_timesteps: int) -> DDPMScheduler:
    """The DDPM schedule of the TenVOO paper's generator (MONAI linear beta, epsilon prediction)."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, schedule="linear_beta", clip_sample=True)


def finetune_generator(
    unet: torch.nn.Module,
    volumes: list[torch.Tensor],
    config: GeneratorFinetuneConfig,
    *,
    checkpoint_dir: str | Path,
    device: torch.device | str = "cpu",
    reporter: Reporter | None = None,
) -> float | None:
    """Fine-tune the trainable parameters of ``unet`` on ``volumes`` ``(1, D, H, W)`` in [0, 1]; returns the last loss."""
    if not volumes:
        raise BadInputError("Generator fine-tuning needs at least one volume.")
    shapes = {tuple(volume.shape) for volume in volumes}
    if len(shapes) != 1:
        raise BadInputError(f"All training volumes must share one shape for the generator; got {sorted(shapes)}.")
    device = torch.device(device)
    data = torch.stack([volume.float().clamp(0, 1) * 2 - 1 for volume in volumes])
    scheduler = training_scheduler(config.num_train_timesteps)
    unet.to(device)

    def loss_fn(network, batch):
        return noise_prediction_loss(unet_denoiser(network), scheduler, data[batch].to(device), loss=F.mse_loss)

    trainable = [p for p in unet.parameters() if p.requires_grad]
    result = train_diffusion(
        unet, loss_fn, list(range(len(volumes))), torch.optim.Adam(trainable, lr=config.lr),
        TrainConfig(max_steps=config.steps, batch_size=min(config.batch_size, len(volumes)), amp=config.amp,
                    checkpoint_every=config.checkpoint_every, keep_checkpoints=1, seed=config.seed),
        checkpoint_dir=checkpoint_dir, reporter=reporter,
    )
    return result.last_loss


def sample_volumes(
    unet: torch.nn.Module,
    count: int,
    shape: tuple[int, int, int],
    *,
    num_train_timesteps: int = 1000,
    seed: int = 0,
    device: torch.device | str = "cpu",
    reporter: Reporter | None = None,
) -> torch.Tensor:
    """Draw ``count`` volumes ``(count, 1, *shape)`` in [0, 1] with full ancestral DDPM sampling."""
    device = torch.device(device)
    scheduler = training_scheduler(num_train_timesteps)
    generator = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn((count, 1, *shape), generator=generator, device=device)
    unet.eval().to(device)
    samples = sample(unet_denoiser(unet), scheduler, noise, generator=generator, reporter=reporter, phase="sampling")
    return ((samples.clamp(-1, 1) + 1) / 2).cpu()
