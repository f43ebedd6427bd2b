"""Image similarity of 3D volumes (MONAI SSIM; PSNR)."""

from __future__ import annotations

import torch
from monai.metrics import SSIMMetric


def ssim_3d(image: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0, win_size: int = 7) -> float:
    """Structural similarity of two ``(I, J, K)`` volumes (3D Gaussian window, MONAI ``SSIMMetric``)."""
    metric = SSIMMetric(spatial_dims=3, data_range=data_range, win_size=win_size)
    return float(metric(image.float()[None, None], reference.float()[None, None]).mean())


def psnr(image: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical volumes)."""
    mse = torch.mean((image.float() - reference.float()) ** 2)
    return float("inf") if mse == 0 else float(10 * torch.log10(data_range**2 / mse))
