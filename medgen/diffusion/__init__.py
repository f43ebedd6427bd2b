"""Shared generative engine: noise schedules, the reverse-diffusion loop, denoiser adapters, the
training objective and the training loop used by synthesis (joint LDM, ControlNet) and translation.

Importing this package registers :data:`SIGMOID_SCHEDULE` in MONAI's ``NoiseSchedules``.
"""

from medgen.diffusion.checkpoint import latest_checkpoint, load_trained_weights
from medgen.diffusion.denoisers import batched_cfg_denoiser, cfg_denoiser, controlnet_denoiser, unet_denoiser
from medgen.diffusion.distributed import DistContext, dist_context_from_env, init_distributed, shard_indices
from medgen.diffusion.objectives import noise_prediction_loss
from medgen.diffusion.sampling import Denoiser, check_ddim_steps, sample, sdedit, strided_timesteps
from medgen.diffusion.schedules import SIGMOID_SCHEDULE, sigmoid_alphas_cumprod
from medgen.diffusion.training import TrainConfig, TrainResult, capped_batch_size, train_diffusion

__all__ = [
    "SIGMOID_SCHEDULE",
    "Denoiser",
    "DistContext",
    "TrainConfig",
    "TrainResult",
    "batched_cfg_denoiser",
    "capped_batch_size",
    "cfg_denoiser",
    "check_ddim_steps",
    "controlnet_denoiser",
    "dist_context_from_env",
    "init_distributed",
    "latest_checkpoint",
    "load_trained_weights",
    "noise_prediction_loss",
    "sample",
    "sdedit",
    "shard_indices",
    "sigmoid_alphas_cumprod",
    "strided_timesteps",
    "train_diffusion",
    "unet_denoiser",
]
