"""DIFF-3 joint VAE and latent normalisation: spec C.9 oracles 1-6 and 9."""

from __future__ import annotations

import math

import pytest
import torch

from medgen.synthesis.joint_vae import (
    JointVAEConfig,
    build_joint_vae,
    decode_pair,
    joint_input,
    joint_vae_loss,
    kl_divergence,
    kl_weight_schedule,
)
from medgen.synthesis.latents import LatentSet, encode_posteriors

TINY = JointVAEConfig(num_classes=3, channels=(8, 8, 16, 16), norm_num_groups=4, num_res_blocks=1, attention=False)


def _batch(batch=2, size=16):
    image = torch.rand(batch, 1, size, size, size)
    label = torch.randint(0, 3, (batch, 1, size, size, size))
    return image, label


def test_oracle1_shapes_divide_by_eight():
    vae = build_joint_vae(TINY)
    image, label = _batch(size=16)
    mu, sigma = vae.encode(joint_input(image, label))
    assert mu.shape == sigma.shape == (2, 4, 2, 2, 2)
    assert vae.decode(mu).shape == (2, 4, 16, 16, 16)
    assert TINY.downsample_factor == 8


def test_oracle2_input_contract_label_is_integer_channel_not_one_hot():
    image, label = _batch()
    stacked = joint_input(image, label)
    assert stacked.shape[1] == 2
    assert torch.equal(stacked[:, 1], label[:, 0].float())
    assert 0 <= float(stacked[:, 0].min()) and float(stacked[:, 0].max()) <= 1


def test_oracle3_loss_contract():
    image, label = _batch()
    logits = torch.nn.functional.one_hot(label[:, 0], 3).permute(0, 4, 1, 2, 3).float() * 40.0 - 20.0
    perfect = torch.cat([image, logits], dim=1)
    mu, sigma = torch.zeros(2, 4, 2, 2, 2), torch.ones(2, 4, 2, 2, 2)
    loss = joint_vae_loss(perfect, image, label, mu, sigma, kl_weight=1.0)
    assert float(loss.image_l1) == 0.0 and float(loss.label_ce) < 1e-6
    assert float(kl_divergence(mu, sigma)) == 0.0
    mu2 = torch.randn(2, 4, 2, 2, 2)
    a, b = (joint_vae_loss(perfect, image, label, mu2, sigma, w).total for w in (1.0, 3.0))
    base = joint_vae_loss(perfect, image, label, mu2, sigma, 0.0).total
    assert torch.allclose(b - base, 3 * (a - base), rtol=1e-5)
    assert kl_weight_schedule(99) == (1e-6, 0.0) and kl_weight_schedule(100) == (1.0, 1.0)


def test_kl_closed_form_and_its_weight_per_voxel_in_the_total():
    """KL(N(mu, sigma²) || N(0, 1)) is 0.5·(mu² + sigma² - 1 - ln sigma²) per latent element, summed per case and averaged
    over the batch; the total loss adds it weighted and divided by the voxels of one case (16³ here), to the mean L1
    and cross-entropy."""
    mu = torch.stack([torch.full((4, 2, 2, 2), 0.5), torch.full((4, 2, 2, 2), -1.0)])
    sigma = torch.stack([torch.full((4, 2, 2, 2), 2.0), torch.full((4, 2, 2, 2), 1.5)])
    per_case = [32 * 0.5 * (m**2 + s**2 - 1 - math.log(s**2)) for m, s in ((0.5, 2.0), (-1.0, 1.5))]
    assert float(kl_divergence(mu, sigma)) == pytest.approx(sum(per_case) / 2, rel=1e-6)
    image, label = _batch()
    reconstruction = torch.randn(2, 4, 16, 16, 16)
    loss = joint_vae_loss(reconstruction, image, label, mu, sigma, kl_weight=0.3)
    assert float(loss.image_l1) == pytest.approx(float((reconstruction[:, :1] - image).abs().mean()), rel=1e-6)
    assert float(loss.label_ce) == pytest.approx(float(torch.nn.functional.cross_entropy(reconstruction[:, 1:], label[:, 0])), rel=1e-6)
    assert float(loss.total) == pytest.approx(float(loss.image_l1 + loss.label_ce) + 0.3 * sum(per_case) / 2 / 16**3, rel=1e-6)


def _latent_set():
    generator = torch.Generator().manual_seed(0)
    mu = torch.randn((3, 4, 2, 2, 2), generator=generator)
    sigma = torch.rand((3, 4, 2, 2, 2), generator=generator) * 0.2 + 0.05
    return LatentSet.from_posteriors(mu, sigma)


def test_oracle4_bounds_cover_three_sigma():
    latents = _latent_set()
    assert latents.g_min <= float((latents.mu - 3 * latents.sigma).min())
    assert latents.g_max >= float((latents.mu + 3 * latents.sigma).max())


def test_oracle5_normalisation_round_trip_and_clipping():
    latents = _latent_set()
    z = torch.linspace(latents.g_min, latents.g_max, 101)
    assert torch.allclose(latents.denormalize(latents.normalize(z)), z, atol=1e-6 * (latents.g_max - latents.g_min) + 1e-6)
    outside = torch.tensor([latents.g_min - 5.0, latents.g_max + 5.0])
    assert torch.allclose(latents.denormalize(latents.normalize(outside)), torch.tensor([latents.g_min, latents.g_max]))


def test_oracle6_dynamic_sampling_draws_differ_and_average_to_mu():
    latents = _latent_set()
    generator = torch.Generator().manual_seed(1)
    index = torch.tensor([1])
    first, second = latents.draw(index, generator), latents.draw(index, generator)
    assert not torch.equal(first, second)
    draws = torch.stack([latents.denormalize(latents.draw(index, generator)) for _ in range(1000)])
    tolerance = 3 * latents.sigma[1] / 1000**0.5
    assert bool(((draws.mean(0)[0] - latents.mu[1]).abs() <= tolerance + 1e-6).all())


def test_oracle9_decoded_pair_is_valid():
    vae = build_joint_vae(TINY).eval()
    with torch.no_grad():
        image, label = decode_pair(vae, torch.randn(2, 4, 2, 2, 2))
    assert image.shape == label.shape == (2, 1, 16, 16, 16)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert label.dtype == torch.int64 and set(torch.unique(label).tolist()) <= {0, 1, 2}
    one_hot = torch.nn.functional.one_hot(label[:, 0], 3)
    assert torch.equal(one_hot.sum(-1), torch.ones_like(label[:, 0]))


def test_encode_posteriors_batches_match_single_pass():
    vae = build_joint_vae(TINY).eval()
    image, label = _batch(batch=3)
    inputs = joint_input(image, label)
    mu_a, sigma_a = encode_posteriors(vae, inputs, batch_size=1)
    mu_b, sigma_b = encode_posteriors(vae, inputs, batch_size=3)
    assert torch.allclose(mu_a, mu_b, atol=1e-5) and torch.allclose(sigma_a, sigma_b, atol=1e-5)


def test_collapsed_latents_are_a_clear_error():
    from medgen.errors import BadInputError

    with pytest.raises(BadInputError, match="collapsed"):
        LatentSet.from_posteriors(torch.zeros(1, 4, 2, 2, 2), torch.zeros(1, 4, 2, 2, 2))
