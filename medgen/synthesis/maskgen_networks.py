"""Networks and schedules of the 3D MRGen-style mask-conditioned generator (spec B.9).

Three MONAI networks share one latent space: an image ``AutoencoderKL`` (1 channel, ``f``-times
downsampling), a prompt-conditioned ``DiffusionModelUNet`` (cross-attention on the context of a
:class:`medgen.synthesis.prompts.LearnedPromptEncoder`) and a ``ControlNet`` copied from that UNet.
The ControlNet's conditioning embedding must downsample the image-resolution control by exactly ``f``
(``len(control_embedding_channels) == log2(f) + 1``, spec D), otherwise its residuals miss the latent grid.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import AutoencoderKL, ControlNet, DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from medgen.diffusion import strided_timesteps
from medgen.errors import BadInputError
from medgen.synthesis.joint_vae import kl_divergence
from medgen.synthesis.masks import ENCODINGS
from medgen.synthesis.prompts import LearnedPromptEncoder, Prompt, PromptEncoder

#: MRGen's noise schedule (Stable Diffusion's): scaled-linear betas 0.00085 -> 0.012 over 1000 steps
SCHEDULE = dict(schedule="scaled_linear_beta", beta_start=0.00085, beta_end=0.012)


@dataclasses.dataclass
class MaskGenConfig:
    """Settings of the mask-conditioned generator (defaults: a 3D GPU recipe after spec B.9; :meth:`tiny` for CPU).

    Args:
        vae_channels, vae_res_blocks, vae_norm_groups, latent_channels: image VAE; ``len(vae_channels) - 1``
            downsamplings (B.9: ``(c, 2c, 4c, 4c)``, 8x).
        vae_loss: ``"l2"`` (MRGen) or ``"l1"`` reconstruction term, mean over voxels.
        vae_kl_weight: w_KL on the KL *averaged* over latent elements (MRGen: 1e-4 with this reduction).
        unet_channels, unet_attention, unet_res_blocks, unet_norm_groups, num_head_channels: latent UNet
            (and ControlNet) architecture; cross-attention (the prompt) acts only at levels with attention.
            Default: every level, as MRGen's UNet has cross-attention at its highest-resolution levels. Without
            it the highest-resolution path of the UNet and the ControlNet residual added to it never see the
            modality, so the ControlNet paints one contrast for both modalities (measured on the toy fidelity
            bench with target pseudo-labels: small-organ Dice 0.21 with attention at the low level only, 0.46
            with attention at both).
        prompt_embedding_dim: E, the context width of the learned prompt encoder (cross_attention_dim).
        control_encoding: ``"one-hot"`` (one channel per organ, recommended in 3D) or ``"merged"`` (MRGen's 1 channel).
        control_embedding_channels: ControlNet conditioning embedding widths; length ``log2(f) + 1``.
        prompt_dropout: probability a training prompt becomes the empty prompt (MRGen: 0.1, enables CFG).
        vae_steps, unet_steps, controlnet_steps: optimiser steps per stage.
        vae_lr, unet_lr, controlnet_lr: AdamW learning rates (MRGen: 5e-5, 1e-5, 1e-5 at far larger batches;
            the UNet default is higher because it is trained from scratch on a small 3D set).
        batch_size, grad_accum_steps, amp, checkpoint_every: as in :class:`medgen.diffusion.TrainConfig`.
        grad_clip_norm: max gradient norm (MRGen's ControlNet: 1.0; used for every stage).
        ema_decay: EMA decay of the UNet + prompt encoder and of the ControlNet (sampling uses EMA weights).
        num_train_timesteps: diffusion steps T.
        train_checker: also train the independent organ checker used to filter candidates (before stage 3).
        checker_preset: ``"default"`` or ``"tiny"`` :class:`medgen.synthesis.checker.CheckerConfig`.
        checker_steps: training steps of the checker (None: the preset's).
        target_pseudo_labels: an extension, not in MRGen (default off): stage 3 sees the target images with the
            checker's predicted masks instead of empty ones. With one annotated source modality the ControlNet
            otherwise only ever sees a mask with source-modality images and paints the source's contrast inside
            it; the checker is trained on source masks with randomised intensities, so it segments the target
            modality too. Needs ``train_checker``. The checker then also filters candidates of a generator that
            learnt from its predictions, so it is less independent.
        controlnet_flip_axes: an extension, not in MRGen (default none): stage 3 flips each training sample (image
            and control together) along each of these spatial axes (0, 1, 2 = I, J, K) with probability 1/2; the
            latents of every flipped image are encoded once (``flipped_latents.safetensors``). With a few dozen
            training volumes the ControlNet otherwise memorises them (toy fidelity bench: small-organ Dice 0.89 on
            training masks, 0.79 on new ones). Only for axes along which a mirrored volume is still plausible.
        unet_flip_axes: the same extension for stage 2 (default none): the latent UNet learns the mirrored
            volumes too. Set it with ``controlnet_flip_axes``: a UNet that only saw the training poses denoises
            their mirrored versions worse (toy bench: noise MSE 0.199 on the training latents, 0.225-0.229 on
            each mirrored set). Toy bench, mean of six seeds (large/small organ Dice): 0.92/0.87 with both stages
            mirrored vs 0.90/0.86 with the ControlNet alone (24,000 steps with the EMA phase; 0.91/0.85 vs
            0.88/0.84 at 18,000). The large organ stays a little darker than the target either way, so the UNet
            explains only part of that.
        seed: seeds every stage's training (torch's RNG and the data order) and the checker's.
    """

    vae_channels: tuple[int, ...] = (32, 64, 128, 128)
    vae_res_blocks: int = 2
    vae_norm_groups: int = 32
    latent_channels: int = 8
    vae_loss: str = "l2"
    vae_kl_weight: float = 1e-4
    unet_channels: tuple[int, ...] = (64, 128, 256)
    unet_attention: tuple[bool, ...] = (True, True, True)
    unet_res_blocks: int = 2
    unet_norm_groups: int = 32
    num_head_channels: int = 32
    prompt_embedding_dim: int = 256
    control_encoding: str = "one-hot"
    control_embedding_channels: tuple[int, ...] = (16, 32, 96, 256)
    prompt_dropout: float = 0.1
    vae_steps: int = 20000
    unet_steps: int = 50000
    controlnet_steps: int = 20000
    vae_lr: float = 5e-5
    unet_lr: float = 1e-4
    controlnet_lr: float = 1e-5
    batch_size: int = 1
    grad_accum_steps: int = 4
    amp: bool = True
    checkpoint_every: int = 1000
    grad_clip_norm: float = 1.0
    ema_decay: float = 0.999
    num_train_timesteps: int = 1000
    train_checker: bool = True
    checker_preset: str = "default"
    checker_steps: int | None = None
    target_pseudo_labels: bool = False
    controlnet_flip_axes: tuple[int, ...] = ()
    unet_flip_axes: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.control_encoding not in ENCODINGS:
            raise BadInputError(f"Unknown control encoding {self.control_encoding!r}; use one of {ENCODINGS}.")
        if self.target_pseudo_labels and not self.train_checker:
            raise BadInputError("target_pseudo_labels needs the checker (train_checker=True): it predicts the target masks.")
        for name in ("controlnet_flip_axes", "unet_flip_axes"):
            axes = getattr(self, name)
            if len(set(axes)) != len(axes) or not set(axes) <= {0, 1, 2}:
                raise BadInputError(f"{name} must be distinct spatial axes among 0, 1, 2; got {tuple(axes)}.")
        if self.vae_loss not in ("l1", "l2"):
            raise BadInputError(f"vae_loss must be 'l1' or 'l2'; got {self.vae_loss!r}.")
        expected = int(math.log2(self.downsample_factor)) + 1
        if len(self.control_embedding_channels) != expected:
            raise BadInputError(
                f"The ControlNet conditioning embedding must downsample by the VAE factor {self.downsample_factor}, "
                f"so it needs {expected} widths; got {tuple(self.control_embedding_channels)}."
            )
        if len(self.unet_attention) != len(self.unet_channels) or not any(self.unet_attention):
            raise BadInputError(
                f"unet_attention needs one flag per UNet level ({len(self.unet_channels)}) and at least one True "
                f"(the prompt acts through cross-attention); got {tuple(self.unet_attention)}."
            )

    @classmethod
    def tiny(cls, **overrides) -> "MaskGenConfig":
        """A CPU configuration for tests and demos: 4x VAE (16³ -> 4³ latents), small widths, few steps."""
        settings = dict(
            vae_channels=(8, 16, 16), vae_res_blocks=1, vae_norm_groups=4, latent_channels=4,
            unet_channels=(16, 32), unet_attention=(True, True), unet_res_blocks=1, unet_norm_groups=8,
            num_head_channels=8, prompt_embedding_dim=16, control_embedding_channels=(8, 16, 32),
            vae_steps=60, unet_steps=60, controlnet_steps=60, vae_lr=2e-3, unet_lr=1e-3, controlnet_lr=1e-3,
            grad_accum_steps=1, amp=False, checkpoint_every=20, ema_decay=0.9, checker_preset="tiny",
        )
        settings.update(overrides)
        return cls(**settings)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)


def build_image_vae(config: MaskGenConfig) -> AutoencoderKL:
    """MONAI ``AutoencoderKL``: image ``(B, 1, I, J, K)`` in [0, 1] <-> latent ``(B, C_lat, I/f, J/f, K/f)``."""
    return AutoencoderKL(
        spatial_dims=3, in_channels=1, out_channels=1, channels=tuple(config.vae_channels),
        latent_channels=config.latent_channels, num_res_blocks=config.vae_res_blocks,
        attention_levels=(False,) * len(config.vae_channels), norm_num_groups=config.vae_norm_groups,
        with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False,
    )


def image_vae_loss(vae: AutoencoderKL, image: torch.Tensor, config: MaskGenConfig) -> torch.Tensor:
    """Mean L2 (or L1) reconstruction + ``vae_kl_weight`` · KL averaged over latent elements (spec B.2)."""
    reconstruction, mu, sigma = vae(image)
    reconstruction_loss = (F.mse_loss if config.vae_loss == "l2" else F.l1_loss)(reconstruction, image)
    return reconstruction_loss + config.vae_kl_weight * kl_divergence(mu, sigma) / mu[0].numel()


def _unet_kwargs(config: MaskGenConfig) -> dict:
    """Arguments the UNet and its ControlNet must share for the weight copy to line up."""
    return dict(
        spatial_dims=3, in_channels=config.latent_channels, channels=tuple(config.unet_channels),
        attention_levels=tuple(config.unet_attention), num_res_blocks=config.unet_res_blocks,
        norm_num_groups=config.unet_norm_groups, num_head_channels=config.num_head_channels,
        with_conditioning=True, cross_attention_dim=config.prompt_embedding_dim,
    )


def build_latent_unet(config: MaskGenConfig) -> DiffusionModelUNet:
    """Prompt-conditioned latent ``DiffusionModelUNet`` (epsilon prediction)."""
    return DiffusionModelUNet(out_channels=config.latent_channels, **_unet_kwargs(config))


def build_controlnet(config: MaskGenConfig, control_channels: int, unet: DiffusionModelUNet | None = None) -> ControlNet:
    """MONAI ``ControlNet`` taking the image-resolution control ``(B, control_channels, I, J, K)``.

    With ``unet``, the shared encoder weights are copied from it (``ControlNetModel.from_unet``): only the
    zero convolutions and the conditioning embedding stay fresh, so at initialisation every residual is 0
    and UNet + ControlNet predicts exactly what the UNet alone does.
    """
    controlnet = ControlNet(
        conditioning_embedding_in_channels=control_channels,
        conditioning_embedding_num_channels=tuple(config.control_embedding_channels),
        **_unet_kwargs(config),
    )
    _propagating_init(controlnet.controlnet_cond_embedding)
    if unet is not None:
        # strict=False: the UNet's decoder keys have no ControlNet counterpart, the zero convs no UNet one
        controlnet.load_state_dict(unet.state_dict(), strict=False)
    return controlnet


def _propagating_init(embedding: nn.Module) -> None:
    """He-normal init of the conditioning embedding's hidden convolutions (``conv_out`` stays zero).

    Measured on the tiny 3D embedding with MONAI's default init, the spatial std of a one-hot mask's
    features shrinks about 5x per convolution (0.064 -> 0.0003 after five), so the zero ``conv_out``
    sees a nearly constant input, its gradient carries no mask information and the trained ControlNet
    ignored the mask. With fan-in He init the std stays at 0.3-0.4 through the stack.
    """
    for module in embedding.modules():
        if isinstance(module, nn.Conv3d | nn.Conv2d) and module is not embedding.conv_out.conv:
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)


class PromptedUNet(nn.Module):
    """The latent UNet and its prompt encoder in stage 2 as one module (one EMA, one DDP wrap, one checkpoint).

    ``forward(x_t (B, C_lat, d, h, w), t (B,), prompts (B,)) -> epsilon prediction (B, C_lat, d, h, w)``.
    A :class:`LearnedPromptEncoder` is a submodule trained with the UNet; any other
    :class:`~medgen.synthesis.prompts.PromptEncoder` (a frozen local text model) stays outside the
    module, so it is in neither the checkpoints, the optimiser nor the EMA copy.
    """

    def __init__(self, unet: DiffusionModelUNet, prompt_encoder: PromptEncoder) -> None:
        super().__init__()
        self.unet = unet
        if isinstance(prompt_encoder, LearnedPromptEncoder):
            self.prompt_encoder = prompt_encoder
        else:
            self.__dict__["prompt_encoder"] = prompt_encoder  # bypasses nn.Module's submodule registration

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, prompts: Sequence[Prompt]) -> torch.Tensor:
        context = self.prompt_encoder.encode_prompts(prompts).to(x_t.device)
        return self.unet(x_t, timesteps=t, context=context)


def training_scheduler(config: MaskGenConfig) -> DDPMScheduler:
    """DDPM, scaled-linear betas 0.00085 -> 0.012, epsilon prediction (spec B.3)."""
    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, **SCHEDULE)


def sampling_scheduler(config: MaskGenConfig, steps: int) -> tuple[DDIMScheduler, list[int]]:
    """DDIM as MRGen samples (spec QB5): ``set_alpha_to_one=False``, ``steps_offset=1``, no clipping, and
    diffusers' "leading" timesteps ``981, 961, ..., 1`` for 50 steps (MONAI's own spacing differs)."""
    stride = config.num_train_timesteps // max(steps, 1)
    offset = min(1, stride - 1)
    scheduler = DDIMScheduler(
        num_train_timesteps=config.num_train_timesteps, clip_sample=False, set_alpha_to_one=False,
        steps_offset=offset, **SCHEDULE,
    )
    return scheduler, strided_timesteps(config.num_train_timesteps, steps, offset=offset)
