"""Spec diffusion_methods.md B.10 #2 and #4 (and D's ControlNet notes) on the engine's ``controlnet_denoiser``, with a
UNet whose output is not identically zero: MONAI zero-initialises each block's last convolution and the output
convolution, so a fresh UNet outputs exactly 0 whatever a ControlNet adds to it."""

from __future__ import annotations

import torch
from monai.networks.nets import ControlNet, DiffusionModelUNet

from medgen.diffusion import controlnet_denoiser, unet_denoiser

ARCHITECTURE = dict(spatial_dims=3, in_channels=1, channels=(8, 8), attention_levels=(False, False), num_res_blocks=1,
                    norm_num_groups=8)


def _unet_and_controlnet():
    torch.manual_seed(0)
    unet = DiffusionModelUNet(out_channels=1, **ARCHITECTURE)
    with torch.no_grad():  # as if trained: refill MONAI's zero-initialised weights
        for parameter in unet.parameters():
            if parameter.dim() > 1 and not parameter.any():
                parameter.normal_(0.0, 0.1)
    controlnet = ControlNet(conditioning_embedding_in_channels=1, conditioning_embedding_num_channels=(8,), **ARCHITECTURE)
    missing, _ = controlnet.load_state_dict(unet.state_dict(), strict=False)
    # spec D: only the ControlNet's own keys (zero convs, conditioning embedding) are missing
    assert missing and all(key.startswith(("controlnet_", "controlnet_cond_embedding")) for key in missing)
    return unet, controlnet


X_T, T = torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 500])
MASK = torch.rand(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(2))


def test_b10_4_zero_initialised_controlnet_is_exactly_the_unet():
    unet, controlnet = _unet_and_controlnet()
    with torch.no_grad():
        plain = unet_denoiser(unet)(X_T, T)
        assert plain.abs().max() > 0.01  # not the trivial all-zero network
        down, mid = controlnet(x=X_T, timesteps=T, controlnet_cond=MASK)
        assert all(not residual.any() for residual in [*down, mid])
        assert torch.equal(controlnet_denoiser(unet, controlnet, MASK)(X_T, T), plain)


def test_trained_controlnet_changes_the_output_and_the_cached_embedding_equals_the_fresh_one():
    unet, controlnet = _unet_and_controlnet()
    with torch.no_grad():
        for parameter in controlnet.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(3)))
        plain = unet_denoiser(unet)(X_T, T)
        denoise = controlnet_denoiser(unet, controlnet, MASK)
        cached = [denoise(X_T, T) for _ in range(2)]  # the second call reuses the embedding
        other_mask = controlnet_denoiser(unet, controlnet, 1 - MASK)(X_T, T)
        unscaled = controlnet_denoiser(unet, controlnet, MASK, conditioning_scale=0.0)(X_T, T)
    fresh = denoise(X_T, T).detach()  # with gradients: the embedding is computed again
    assert not torch.allclose(cached[0], plain, atol=1e-4)
    assert torch.equal(cached[0], cached[1])
    assert torch.allclose(cached[0], fresh, atol=1e-6)
    assert not torch.allclose(other_mask, cached[0], atol=1e-4)  # each denoiser embeds its own control
    assert torch.allclose(unscaled, plain, atol=1e-6)


def test_b10_2_training_batches_drop_ten_percent_of_prompts():
    """The default prompt dropout reaches the training batches at the spec's rate (the existing tests check the
    composer's ``drop_prompt`` and the batch path at 0 and 1 only)."""
    from medgen.synthesis.maskgen_networks import MaskGenConfig
    from medgen.synthesis.maskgen_training import _LatentData
    from medgen.synthesis.prompts import Prompt, TrainingSample

    prompt = Prompt("T2 MRI", region="abdomen")
    samples = [TrainingSample(torch.zeros(1, 2, 2, 2), None, prompt, False)]
    mu = torch.zeros(1, 1, 2, 2, 2)
    data = _LatentData(samples, mu, mu, 1.0, None, MaskGenConfig().prompt_dropout)
    torch.manual_seed(0)
    dropped = data.dropped_prompts(torch.zeros(10_000, dtype=torch.long))
    rate = sum(p.is_empty for p in dropped) / len(dropped)
    assert abs(rate - 0.1) <= 0.01, rate
