"""The joint image + label VAE of DIFF-3 (spec C.3) on MONAI's ``AutoencoderKL``.

Input ``(B, 2, I, J, K)``: channel 0 the image in [0, 1], channel 1 the *integer* label as a float
(never one-hot, C.9 oracle 2). Output ``(B, 1 + K, I, J, K)``: the reconstructed image and K label
logits. The latent has 4 channels at 1/8 of the resolution (3 downsamplings).

Loss reductions (spec QC2): the released code sums per-voxel terms, so cross-entropy and the
perceptual term count N_vox times and the KL weight is relative to a voxel *sum*. We use mean
reductions (scale-free, so the learning rate does not depend on the volume size) and divide the
KL by N_vox, which keeps exactly the released balance between the three terms. The perceptual term
is off: its VGG weights cannot be downloaded at run time.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from monai.networks.nets import AutoencoderKL

from medgen.errors import BadInputError


@dataclasses.dataclass(frozen=True)
class JointVAEConfig:
    """Architecture of the joint VAE (spec C.8 MONAI mapping; smaller channels for CPU demos).

    Args:
        num_classes: K, label classes including background.
        channels: feature widths per level; ``len(channels) - 1`` downsamplings.
        latent_channels: latent channels (4 in DIFF-3).
        num_res_blocks: residual blocks per level.
        norm_num_groups: GroupNorm groups (must divide every width).
        attention: the mid-block self-attention of encoder and decoder.
    """

    num_classes: int
    channels: tuple[int, ...] = (32, 64, 128, 128)
    latent_channels: int = 4
    num_res_blocks: int = 2
    norm_num_groups: int = 32
    attention: bool = True

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


def build_joint_vae(config: JointVAEConfig) -> AutoencoderKL:
    """MONAI ``AutoencoderKL`` with 2 input channels and ``1 + num_classes`` outputs."""
    if config.num_classes < 2:
        raise BadInputError(f"The joint VAE needs at least 2 label classes (background + 1); got {config.num_classes}.")
    return AutoencoderKL(
        spatial_dims=3,
        in_channels=2,
        out_channels=1 + config.num_classes,
        channels=config.channels,
        latent_channels=config.latent_channels,
        num_res_blocks=config.num_res_blocks,
        attention_levels=(False,) * len(config.channels),
        norm_num_groups=config.norm_num_groups,
        with_encoder_nonlocal_attn=config.attention,
        with_decoder_nonlocal_attn=config.attention,
    )


def joint_input(image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Stack image ``(B, 1, ...)`` in [0, 1] and integer label ``(B, 1, ...)`` into ``(B, 2, ...)`` float."""
    return torch.cat([image.float(), label.float()], dim=1)


def kl_weight_schedule(epoch: int, phase_one_epochs: int = 100) -> tuple[float, float]:
    """``(w_KL, w_perceptual)`` of the two-phase schedule: (1e-6, 0) before ``phase_one_epochs``, then (1, 1).

    The perceptual weight is returned for completeness; MedGen has no offline perceptual network.
    """
    return (1e-6, 0.0) if epoch < phase_one_epochs else (1.0, 1.0)


def kl_divergence(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma²) || N(0, 1)) summed over latent elements, averaged over the batch."""
    sigma_sq = sigma.pow(2).clamp_min(1e-12)
    per_element = 0.5 * (mu.pow(2) + sigma_sq - 1.0 - torch.log(sigma_sq))
    return per_element.flatten(1).sum(1).mean()


@dataclasses.dataclass
class JointVAELoss:
    """Loss terms of one batch (all scalars)."""

    total: torch.Tensor
    image_l1: torch.Tensor
    label_ce: torch.Tensor
    kl: torch.Tensor


def joint_vae_loss(
    reconstruction: torch.Tensor,
    image: torch.Tensor,
    label: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    kl_weight: float,
) -> JointVAELoss:
    """Mean L1 on the image + mean cross-entropy on the label + ``kl_weight`` · KL / N_vox.

    Args:
        reconstruction: decoder output ``(B, 1 + K, I, J, K)``.
        image: ``(B, 1, I, J, K)`` in [0, 1].
        label: ``(B, 1, I, J, K)`` integer classes 0..K-1.
        mu, sigma: posterior ``(B, 4, I/8, J/8, K/8)``.
        kl_weight: w_KL of :func:`kl_weight_schedule`.
    """
    voxels_per_case = image[0].numel()
    image_l1 = F.l1_loss(reconstruction[:, :1], image.float())
    label_ce = F.cross_entropy(reconstruction[:, 1:], label[:, 0].long())
    kl = kl_divergence(mu, sigma)
    return JointVAELoss(image_l1 + label_ce + kl_weight * kl / voxels_per_case, image_l1, label_ce, kl)


def decode_pair(vae: AutoencoderKL, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode latents to an aligned pair: image ``(B, 1, ...)`` clipped to [0, 1], label ``(B, 1, ...)`` = argmax."""
    output = vae.decode(latent)
    return output[:, :1].clamp(0.0, 1.0), output[:, 1:].argmax(dim=1, keepdim=True)
