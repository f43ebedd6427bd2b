"""Metric behaviour that no other test pinned down (found by mutation testing)."""

from __future__ import annotations

import math

import pytest
import torch

from medgen.metrics import layer_features, ms_ssim_3d, psnr, ssim_3d


def test_layer_features_are_global_average_pooled():
    """With an identity layer the features are the channel means of each volume (the documented global average)."""
    network = torch.nn.Sequential(torch.nn.Identity())
    generator = torch.Generator().manual_seed(0)
    volumes = [torch.rand(2, 5, 6, 7, generator=generator) * scale for scale in (1.0, 3.0)]
    features = layer_features(network, "0", volumes)
    expected = torch.stack([volume.mean(dim=(1, 2, 3)) for volume in volumes])
    torch.testing.assert_close(features, expected)


@pytest.mark.parametrize("metric", [ssim_3d, ms_ssim_3d, psnr], ids=["ssim", "ms_ssim", "psnr"])
def test_image_metrics_honour_the_data_range(metric):
    """Similarity of 8-bit volumes with data_range=255 equals that of the same volumes scaled to [0, 1]. Low-contrast
    volumes, where SSIM's stabilising constants (k·data_range)² weigh as much as the variances."""
    size = 48 if metric is ms_ssim_3d else 12
    generator = torch.Generator().manual_seed(1)
    reference = 0.02 * torch.rand(size, size, size, generator=generator)
    image = reference + 0.01 * torch.rand(size, size, size, generator=generator)
    unit = metric(image, reference, data_range=1.0)
    eight_bit = metric(image * 255, reference * 255, data_range=255.0)
    assert eight_bit == pytest.approx(unit, rel=1e-3, abs=1e-4)
    assert unit < (1.0 if metric is not psnr else math.inf)

