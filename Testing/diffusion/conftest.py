"""Tiny networks shared by the diffusion engine tests (CPU, fixed seeds).

MONAI's 3D UNet costs seconds per call at 16^3 on a busy 2-core CPU, so the UNet tests use 8^3
volumes and the training tests a two-convolution denoiser; the engine code paths are the same.
"""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import ControlNet, DiffusionModelUNet
from torch import nn

import medgen.diffusion  # noqa: F401  (registers the sigmoid schedule)


# one downsampling level: spatial sizes must be even
TINY_ARCHITECTURE = dict(
    spatial_dims=3, in_channels=1, channels=(8, 8), attention_levels=(False, False), num_res_blocks=1, norm_num_groups=8
)


class TinyDenoiser(nn.Module):
    """conv -> add a learned embedding of t/T -> SiLU -> conv: the smallest time-conditioned epsilon model."""

    def __init__(self, channels: int = 1, width: int = 4, num_train_timesteps: int = 1000) -> None:
        super().__init__()
        self.num_train_timesteps = num_train_timesteps
        self.conv_in = nn.Conv3d(channels, width, 3, padding=1)
        self.time_embedding = nn.Linear(1, width)
        self.conv_out = nn.Conv3d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        time_features = self.time_embedding(timesteps.float().view(-1, 1) / self.num_train_timesteps)
        hidden = self.conv_in(x) + time_features.view(*time_features.shape, 1, 1, 1)
        return self.conv_out(torch.nn.functional.silu(hidden))


@pytest.fixture
def tiny_unet() -> DiffusionModelUNet:
    """As if trained: MONAI zero-initialises each block's last convolution and the output convolution, so a fresh
    UNet outputs exactly 0 and would hide whatever a ControlNet adds to it."""
    torch.manual_seed(0)
    unet = DiffusionModelUNet(out_channels=1, **TINY_ARCHITECTURE)
    with torch.no_grad():
        for parameter in unet.parameters():
            if parameter.dim() > 1 and not parameter.any():
                parameter.normal_(0.0, 0.1)
    return unet


@pytest.fixture
def tiny_controlnet_from(tiny_unet) -> ControlNet:
    """A ControlNet for ``tiny_unet`` (1-channel control on the same grid), initialised from its weights."""
    controlnet = ControlNet(
        conditioning_embedding_in_channels=1, conditioning_embedding_num_channels=(8,), **TINY_ARCHITECTURE
    )
    controlnet.load_state_dict(tiny_unet.state_dict(), strict=False)
    return controlnet


@pytest.fixture
def make_tiny_denoiser():
    """Factory ``make_tiny_denoiser(seed=0) -> TinyDenoiser`` (fixtures work in every pytest import mode)."""

    def make(seed: int = 0) -> TinyDenoiser:
        torch.manual_seed(seed)
        return TinyDenoiser()

    return make
