"""Robust intensity scaling to [0, 1], the one rule every capability uses for scanner units."""

from __future__ import annotations

import torch
from monai.transforms import ScaleIntensityRange
from monai.transforms.utils_pytorch_numpy_unification import percentile

#: percentiles that map to 0 and 1 unless a model spec says otherwise
DEFAULT_PERCENTILES = (0.5, 99.5)


def scale_to_unit(volume: torch.Tensor, lower: float = DEFAULT_PERCENTILES[0], upper: float = DEFAULT_PERCENTILES[1],
                  channel_wise: bool = False) -> torch.Tensor:
    """``volume`` ``(C, ...)`` as float32 in [0, 1]: its ``lower``/``upper`` percentiles map to 0 and 1, values beyond
    are clipped (a MetaTensor keeps its affine).

    Where the two percentiles coincide (a volume that is mostly one value, e.g. a small object on an empty
    background), its minimum and maximum are used instead, so the object keeps its contrast; MONAI's
    ``ScaleIntensityRangePercentiles`` would return such a volume unscaled and unclipped. A constant volume becomes 0.

    Args:
        volume: ``(C, ...)`` intensities in any unit.
        lower, upper: percentiles in [0, 100], ``lower < upper``.
        channel_wise: scale each channel by its own percentiles (else all channels together).
    """
    volume = volume.float()
    if channel_wise:
        return torch.stack([scale_to_unit(channel[None], lower, upper)[0] for channel in volume])
    # 0-d float32 tensors, as MONAI's transform uses them: results match it bit for bit where it scales
    low, high = (torch.as_tensor(percentile(volume, q)) for q in (lower, upper))
    if high <= low:
        low, high = volume.min(), volume.max()
    if high <= low:
        return torch.zeros_like(volume)
    return ScaleIntensityRange(low, high, 0.0, 1.0, clip=True)(volume)
