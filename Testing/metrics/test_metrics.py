"""medgen.metrics on hand-checkable cases."""

import numpy as np
import pytest
import torch

from medgen.errors import BadInputError
from medgen.metrics import dice_per_class, hd95_per_class, psnr, ssim_3d


def test_dice_per_class_matches_hand_count():
    reference = torch.zeros(10, 10, 10, dtype=torch.int64)
    reference[:5] = 1
    prediction = torch.zeros_like(reference)
    prediction[:4] = 1  # 400 of reference's 500 voxels
    dice = dice_per_class(prediction, reference, num_classes=3)
    assert dice[1] == pytest.approx(2 * 400 / (400 + 500))
    assert dice[0] == pytest.approx(2 * 500 / (600 + 500))
    assert dice[2] == 1.0  # absent from both


def test_hd95_is_the_shift_in_mm():
    reference = torch.zeros(20, 20, 20, dtype=torch.int64)
    reference[5:10, 5:10, 5:10] = 1
    shifted = torch.roll(reference, shifts=2, dims=0)
    assert hd95_per_class(shifted, reference, 2, spacing_mm=(1.5, 1.0, 1.0))[0] == pytest.approx(3.0)
    assert np.isnan(hd95_per_class(torch.zeros_like(reference), reference, 2)[0])


def test_image_metrics():
    volume = torch.rand(16, 16, 16)
    assert ssim_3d(volume, volume) == pytest.approx(1.0, abs=1e-5)
    assert ssim_3d(volume, torch.rand(16, 16, 16)) < 0.5
    assert psnr(volume, volume) == float("inf")
    assert psnr(volume, volume + 0.1) == pytest.approx(20.0, abs=1e-3)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(BadInputError, match="differ in shape"):
        dice_per_class(torch.zeros(4, 4, 4), torch.zeros(4, 4, 5), 2)
