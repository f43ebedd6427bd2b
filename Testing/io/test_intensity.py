"""The shared [0, 1] intensity scaling: MONAI's percentile rule, and volumes that are mostly one value."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import ScaleIntensityRangePercentiles

from medgen.io import scale_to_unit


@pytest.mark.parametrize("channel_wise", [False, True])
def test_ordinary_volumes_scale_bit_for_bit_as_monai_does(channel_wise):
    """Model folders record a hash of their prepared training data: the shared rule must not move a single bit."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        volume = torch.randn(2, 11, 13, 9, generator=generator) * torch.tensor([300.0, 2.0]).view(2, 1, 1, 1) + 40
        expected = ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True, channel_wise=channel_wise)(volume)
        assert torch.equal(torch.as_tensor(scale_to_unit(volume, channel_wise=channel_wise)), torch.as_tensor(expected))


def test_a_small_object_on_an_empty_background_keeps_its_contrast_in_0_1(oblique):
    """0.4 % bright voxels: both percentiles are 0, where MONAI's transform returns raw, unclipped intensities."""
    volume = torch.zeros(1, 20, 20, 25)
    volume[0, 3:5, 4:6, 5:9] = torch.tensor([400.0, 800.0]).repeat_interleave(8).view(2, 2, 4)
    with pytest.warns(Warning, match="Divide by zero"):
        assert float(ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True)(volume).max()) == 800.0
    scaled = scale_to_unit(MetaTensor(volume, affine=torch.from_numpy(oblique)))
    assert torch.equal(scaled.affine, torch.from_numpy(oblique).to(scaled.affine.dtype))
    assert sorted(torch.unique(scaled.as_tensor()).tolist()) == [0.0, 0.5, 1.0]  # min/max scaling keeps the ratio


def test_a_constant_volume_becomes_zero_and_channels_scale_on_their_own():
    assert torch.equal(scale_to_unit(torch.full((1, 4, 4, 4), 7.0)), torch.zeros(1, 4, 4, 4))
    volume = torch.stack([torch.linspace(0, 1, 64), torch.linspace(0, 1000, 64)]).view(2, 4, 4, 4)
    per_channel = scale_to_unit(volume, channel_wise=True)
    assert torch.allclose(per_channel[0], per_channel[1], atol=1e-6)
    together = scale_to_unit(volume)
    assert float(together[0].max()) < 0.01  # one range for both channels: the small one stays dark


def test_training_pairs_of_a_sparse_image_stay_in_0_1(oblique):
    from medgen.synthesis.prepare import prepare_pairs

    image = torch.zeros(1, 20, 20, 20)
    image[0, 2:4, 2:4, 2:4] = 900.0
    label = torch.zeros(1, 20, 20, 20, dtype=torch.int64)
    label[0, 2:4, 2:4, 2:4] = 1
    affine = torch.from_numpy(oblique)
    prepared, _ = prepare_pairs([("a", MetaTensor(image, affine=affine), MetaTensor(label, affine=affine))], shape=(16, 16, 16))
    assert 0.0 <= float(prepared[0].image.min()) and float(prepared[0].image.max()) == 1.0
