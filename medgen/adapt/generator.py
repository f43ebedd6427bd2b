"""Fine-tuning a pretrained 3D DDPM generator with a PEFT method (the TenVOO paper's setting), and sampling it.

The generator is a MONAI ``DiffusionModelUNet`` predicting noise; training minimises the MSE between
true and predicted noise at uniform random timesteps (``medgen.diffusion.noise_prediction_loss``) on
the shared loop (AMP on GPU, EMA off by default, checkpoints with exact resume, cancellation); a partly frozen
UNet trains in ``eval()`` mode, as in segmentation fine-tuning.
The noise schedule and the intensity range are those the generator was pretrained with
(:class:`DiffusionSettings`, read from its model spec); the user's volumes come in [0, 1].
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDPMScheduler

from medgen.diffusion import TrainConfig, capped_batch_size, noise_prediction_loss, sample, train_diffusion, unet_denoiser
from medgen.errors import BadInputError
from medgen.io.model_folder import check_same_run
from medgen.models.spec import ModelSpec
from medgen.models.weights import starting_weights_hash, weights_hash
from medgen.peft import trains_whole_model
from medgen.progress import Reporter


@dataclasses.dataclass(frozen=True)
class DiffusionSettings:
    """How a pretrained DDPM generator was trained (model spec field ``diffusion``, checked there).

    Defaults are the TenVOO paper's (spec tenvoo.md §7.2–7.3): epsilon prediction on volumes in [0, 1] with
    MONAI's ``scaled_linear_beta`` schedule, betas = linspace(√0.0005, √0.0195, 1000)².

    Args:
        schedule: MONAI ``NoiseSchedules`` name taking a beta range (``linear_beta``, ``scaled_linear_beta``,
            ``sigmoid_beta``).
        beta_start: first beta.
        beta_end: last beta.
        num_train_timesteps: T.
        intensity_range: (lo, hi) the training volumes were scaled to; [0, 1] volumes are mapped linearly onto it.
    """

    schedule: str = "scaled_linear_beta"
    beta_start: float = 0.0005
    beta_end: float = 0.0195
    num_train_timesteps: int = 1000
    intensity_range: tuple[float, float] = (0.0, 1.0)

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> DiffusionSettings:
        """The settings of a generator's model spec; fields it leaves out keep the paper's values."""
        settings = dict(spec.diffusion)
        if "intensity_range" in settings:
            settings["intensity_range"] = tuple(float(bound) for bound in settings["intensity_range"])
        return cls(**settings)

    def scheduler(self) -> DDPMScheduler:
        """The DDPM scheduler (epsilon prediction, x0 clipped to [-1, 1] as MONAI's default, widened to
        ``intensity_range`` when it reaches further)."""
        low, high = self.intensity_range
        return DDPMScheduler(
            num_train_timesteps=self.num_train_timesteps, schedule=self.schedule, beta_start=self.beta_start,
            beta_end=self.beta_end, clip_sample=True, clip_sample_min=min(-1.0, low), clip_sample_max=max(1.0, high),
        )

    def to_model_range(self, volumes: torch.Tensor) -> torch.Tensor:
        """Map intensities in [0, 1] (any shape) linearly onto ``intensity_range``."""
        low, high = self.intensity_range
        return low + (high - low) * volumes

    def from_model_range(self, volumes: torch.Tensor) -> torch.Tensor:
        """Map generated intensities back from ``intensity_range`` to [0, 1], clamped."""
        low, high = self.intensity_range
        return ((volumes - low) / (high - low)).clamp(0, 1)


@dataclasses.dataclass
class GeneratorFinetuneConfig:
    """Settings of generator fine-tuning.

    Args:
        steps: optimiser steps.
        batch_size: volumes per step, capped to the number of training volumes.
        lr: Adam learning rate.
        amp: bf16 autocast on CUDA GPUs with native bf16 (see :func:`medgen.diffusion.training.amp_applies`).
        checkpoint_every: steps between checkpoints.
        seed: data order and noise.
    """

    steps: int = 200
    batch_size: int = 1
    lr: float = 1e-4
    amp: bool = True
    checkpoint_every: int = 50
    seed: int = 0


def finetune_generator(
    unet: torch.nn.Module,
    volumes: list[torch.Tensor],
    config: GeneratorFinetuneConfig,
    *,
    checkpoint_dir: str | Path,
    diffusion: DiffusionSettings | None = None,
    device: torch.device | str = "cpu",
    reporter: Reporter | None = None,
) -> float | None:
    """Fine-tune the trainable parameters of ``unet`` on ``volumes`` ``(1, D, H, W)`` in [0, 1]; returns the last loss.

    ``diffusion``: how ``unet`` was pretrained (default: the TenVOO paper's settings).
    """
    if not volumes:
        raise BadInputError("Generator fine-tuning needs at least one volume.")
    shapes = {tuple(volume.shape) for volume in volumes}
    if len(shapes) != 1:
        raise BadInputError(f"All training volumes must share one shape for the generator; got {sorted(shapes)}.")
    diffusion = diffusion or DiffusionSettings()
    device = torch.device(device)
    data = diffusion.to_model_range(torch.stack([volume.float().clamp(0, 1) for volume in volumes]))
    scheduler = diffusion.scheduler()
    unet.to(device)

    def loss_fn(network, batch):  # the trainer hands the batch's indices on the model's device; data stays on the CPU
        return noise_prediction_loss(unet_denoiser(network), scheduler, data[batch.cpu()].to(device), loss=F.mse_loss)

    # a resumed run restores the optimiser and the network from its checkpoint: other settings, volumes or starting
    # weights (another base model) would silently continue the old run
    check_same_run(checkpoint_dir, {**dataclasses.asdict(config), **dataclasses.asdict(diffusion),
                                    "frozen_weights": starting_weights_hash(unet)},
                   weights_hash({"volumes": data}), may_change=("steps", "checkpoint_every"))  # a constant learning rate: steps may grow
    trainable = [p for p in unet.parameters() if p.requires_grad]
    result = train_diffusion(
        unet, loss_fn, list(range(len(volumes))), torch.optim.Adam(trainable, lr=config.lr),
        TrainConfig(max_steps=config.steps, batch_size=capped_batch_size(config.batch_size, len(volumes), reporter), amp=config.amp,
                    checkpoint_every=config.checkpoint_every, keep_checkpoints=1, seed=config.seed,
                    train_mode=trains_whole_model(unet)),
        checkpoint_dir=checkpoint_dir, reporter=reporter,
    )
    return result.last_loss


def sample_volumes(
    unet: torch.nn.Module,
    count: int,
    shape: tuple[int, int, int],
    *,
    diffusion: DiffusionSettings | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    reporter: Reporter | None = None,
) -> torch.Tensor:
    """Draw ``count`` volumes ``(count, 1, *shape)`` in [0, 1] with full ancestral DDPM sampling (T steps).

    ``diffusion``: how ``unet`` was pretrained (default: the TenVOO paper's settings).
    """
    diffusion = diffusion or DiffusionSettings()
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn((count, 1, *shape), generator=generator, device=device)
    unet.eval().to(device)
    samples = sample(
        unet_denoiser(unet), diffusion.scheduler(), noise, generator=generator, reporter=reporter, phase="sampling"
    )
    return diffusion.from_model_range(samples).cpu()
