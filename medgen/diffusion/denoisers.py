"""Small adapters that turn MONAI networks into the ``denoise(x_t, t)`` callables of :func:`sample`.

Each adapter closes over the network and its fixed conditioning; a family whose condition depends on
``x_t`` (LMI translation) writes its own two-line closure instead.
"""

from __future__ import annotations

import torch
from torch import nn

from medgen.diffusion.sampling import Denoiser


def unet_denoiser(
    unet: nn.Module, context: torch.Tensor | None = None, concat: torch.Tensor | None = None
) -> Denoiser:
    """Denoiser for a MONAI ``DiffusionModelUNet``.

    Args:
        unet: network called as ``unet(x, timesteps=t, context=context)``.
        context: cross-attention context ``(B, L, E)``, e.g. a text embedding; None when unconditioned.
        concat: channel-concatenated condition ``(B, C_cond, D, H, W)`` on the grid of ``x_t``
            (the network's ``in_channels`` is ``C + C_cond``); cast to ``x_t``'s dtype.
    """

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        network_input = x_t if concat is None else torch.cat([x_t, concat.to(x_t.dtype)], dim=1)
        return unet(network_input, timesteps=t, context=context)

    return denoise


class _Constant(nn.Module):
    """Stands in for a module whose output is already known: returns ``value`` whatever it is given."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, *args) -> torch.Tensor:
        return self.value


def controlnet_denoiser(
    unet: nn.Module,
    controlnet: nn.Module,
    control: torch.Tensor,
    context: torch.Tensor | None = None,
    conditioning_scale: float = 1.0,
) -> Denoiser:
    """Denoiser for a MONAI ``ControlNet`` steering a ``DiffusionModelUNet`` (MRGen's mask control).

    Args:
        unet, controlnet: the frozen UNet and its ControlNet, same ``channels``/``attention_levels``.
        control: control image ``(B, C_ctrl, D', H', W')`` at image resolution; the ControlNet's
            conditioning embedding downsamples it by the autoencoder factor to the latent grid.
        context: cross-attention context ``(B, L, E)`` or None.
        conditioning_scale: multiplier of the ControlNet residuals (1 = as trained, 0 = UNet alone).

    Without gradients (sampling) the control's conditioning embedding is computed once and reused at every step:
    the control does not change, and re-embedding it at image resolution was 39 % of a sampling step (tiny
    maskgen model, CFG); with gradients (training) it runs every call.
    """
    embedded: dict[torch.dtype, torch.Tensor] = {}

    def residuals(x_t: torch.Tensor, t: torch.Tensor, controlnet_cond: torch.Tensor):
        return controlnet(x=x_t, timesteps=t, controlnet_cond=controlnet_cond, conditioning_scale=conditioning_scale,
                          context=context)

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        controlnet_cond = control.to(x_t.dtype)
        if torch.is_grad_enabled():  # training (the ControlNet may be wrapped in DistributedDataParallel)
            down_residuals, mid_residual = residuals(x_t, t, controlnet_cond)
        else:
            network = getattr(controlnet, "module", controlnet)
            embedding = network.controlnet_cond_embedding
            if x_t.dtype not in embedded:
                embedded[x_t.dtype] = embedding(controlnet_cond)
            network.controlnet_cond_embedding = _Constant(embedded[x_t.dtype])
            try:
                down_residuals, mid_residual = residuals(x_t, t, controlnet_cond)
            finally:
                network.controlnet_cond_embedding = embedding
        return unet(
            x_t,
            timesteps=t,
            context=context,
            down_block_additional_residuals=down_residuals,
            mid_block_additional_residual=mid_residual,
        )

    return denoise


def cfg_denoiser(conditional: Denoiser, unconditional: Denoiser, guidance_scale: float) -> Denoiser:
    """Classifier-free guidance: ``uncond + guidance_scale * (cond - uncond)``.

    Unlike MONAI's inferer ``cfg=`` (which fills the context with a constant), the unconditional branch
    is any denoiser, e.g. the same UNet with the embedding of the empty prompt (MRGen behaviour).

    Args:
        conditional, unconditional: denoisers for the conditioned and the dropped condition.
        guidance_scale: 1 = conditional only, > 1 strengthens the condition.
    """

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        prediction_uncond = unconditional(x_t, t)
        return prediction_uncond + guidance_scale * (conditional(x_t, t) - prediction_uncond)

    return denoise


def batched_cfg_denoiser(both_branches: Denoiser, guidance_scale: float) -> Denoiser:
    """Classifier-free guidance with both branches in one doubled batch (one network call per step).

    Same arithmetic as :func:`cfg_denoiser` up to batching round-off, usually faster on a GPU.

    Args:
        both_branches: denoiser whose conditioning is already doubled so that, called on
            ``cat([x_t, x_t])``, the first half is the unconditional and the second the conditional prediction.
        guidance_scale: as for :func:`cfg_denoiser`.
    """

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        unconditional, conditional = both_branches(torch.cat([x_t, x_t]), torch.cat([t, t])).chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    return denoise
