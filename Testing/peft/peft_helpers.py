"""Tiny models shared by the peft tests (CPU, fixed seeds, 16³–32³ volumes)."""

from __future__ import annotations

import torch
from monai.networks.nets import DiffusionModelUNet, SwinUNETR
from torch import nn

#: the 3D DDPM UNet of the TenVOO paper (MONAI-core arguments, spec tenvoo.md §7.1)
PAPER_UNET_ARGS = dict(
    spatial_dims=3,
    in_channels=1,
    out_channels=1,
    num_res_blocks=2,
    channels=(32, 32, 64, 128, 256, 512),
    attention_levels=(False, False, False, False, True, True),
    norm_num_groups=32,
    norm_eps=1e-6,
    num_head_channels=(0, 0, 0, 0, 256, 512),
)


def tiny_unet(seed: int = 0) -> DiffusionModelUNet:
    """A two-level DDPM UNet without attention, re-randomised so its output is not identically 0."""
    torch.manual_seed(seed)
    unet = DiffusionModelUNet(
        spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=1, channels=(32, 64),
        attention_levels=(False, False), norm_num_groups=32,
    )
    return rerandomize_zero_weights(unet)


def rerandomize_zero_weights(model: nn.Module, std: float = 0.05) -> nn.Module:
    """MONAI zero-initialises every ResnetBlock conv2 and the output conv (spec trap §1.11): refill them."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1 and not parameter.any():
                parameter.normal_(0.0, std)
    return model


def unet_inputs(seed: int = 1, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A (2, 1, size³) volume and two timesteps."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 1, size, size, size, generator=generator), torch.tensor([10, 500])


def tiny_swin(seed: int = 0) -> SwinUNETR:
    """A small SwinUNETR (feature_size 12, one block per stage, binary head) in eval mode, as FSEFT trains it.

    Instance norms keep running statistics so that a 32³ input (1³ bottleneck) is valid in eval mode.
    """
    torch.manual_seed(seed)
    norm = ("instance", {"track_running_stats": True})
    return SwinUNETR(in_channels=1, out_channels=1, feature_size=12, depths=(1, 1, 1, 1), norm_name=norm).eval()


def perturb_trainable(model: nn.Module, scale: float = 0.02, seed: int = 3) -> None:
    """Add noise to every trainable tensor, as a few optimiser steps would (zero-init branches become active)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
