"""Image similarity of 3D volumes (MONAI SSIM; PSNR)."""

from __future__ import annotations

import torch
from monai.metrics import SSIMMetric

from medgen.errors import BadInputError


def volume_pair(image: torch.Tensor, reference: torch.Tensor, minimum_side: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two volumes ``(I, J, K)`` (or the library's ``(1, I, J, K)``) as float32 ``(I, J, K)`` plain tensors.

    Raises:
        BadInputError: not 3D, shapes that differ (no broadcasting), or a side shorter than ``minimum_side``.
    """
    pair = []
    for name, volume in (("image", image), ("reference", reference)):
        volume = torch.as_tensor(volume).float()
        volume = volume.as_tensor() if hasattr(volume, "as_tensor") else volume
        volume = volume[0] if volume.ndim == 4 and volume.shape[0] == 1 else volume
        if volume.ndim != 3:
            raise BadInputError(f"The {name} must be one 3D volume (I, J, K) or (1, I, J, K); got shape {tuple(volume.shape)}.")
        pair.append(volume)
    if pair[0].shape != pair[1].shape:
        raise BadInputError(f"Image {tuple(pair[0].shape)} and reference {tuple(pair[1].shape)} differ in shape.")
    if min(pair[0].shape) < minimum_side:
        raise BadInputError(f"This metric needs every side >= {minimum_side} voxels; got {tuple(pair[0].shape)}.")
    return pair[0], pair[1]


def ssim_3d(image: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0, win_size: int = 7) -> float:
    """Structural similarity of two ``(I, J, K)`` volumes (3D Gaussian window, MONAI ``SSIMMetric``)."""
    image, reference = volume_pair(image, reference, minimum_side=win_size)
    metric = SSIMMetric(spatial_dims=3, data_range=data_range, win_size=win_size)
    return float(metric(image[None, None], reference[None, None]).mean())


def psnr(image: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of two ``(I, J, K)`` volumes (inf for identical volumes)."""
    image, reference = volume_pair(image, reference)
    mse = torch.mean((image - reference) ** 2)
    return float("inf") if mse == 0 else float(10 * torch.log10(data_range**2 / mse))
