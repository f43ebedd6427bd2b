"""Distribution metrics of generated volumes: FID on pluggable 3D features, MMD, MS-SSIM (MONAI).

No feature network is downloaded at run time: FID uses features from a network the caller supplies
(any ``nn.Module`` and one of its layers), typically the base model's own encoder; the report says
which network and layer were used.
"""

from __future__ import annotations

from typing import Iterable

import torch
from monai.metrics import FIDMetric, MMDMetric, MultiScaleSSIMMetric
from torch import nn

from medgen.errors import BadInputError


@torch.no_grad()
def layer_features(network: nn.Module, layer: str, volumes: Iterable[torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
    """Global-average-pooled activations of ``network.<layer>`` for each volume.

    Args:
        network: feature network (eval mode is set here).
        layer: dotted module name, e.g. ``"encoder.3"`` (see ``network.named_modules()``).
        volumes: tensors ``(C, D, H, W)`` in the network's input convention.

    Returns:
        ``(N, F)`` float32 features.
    """
    modules = dict(network.named_modules())
    if layer not in modules:
        raise BadInputError(f"{type(network).__name__} has no layer {layer!r}; some layers: {list(modules)[1:8]}.")
    captured: list[torch.Tensor] = []
    hook = modules[layer].register_forward_hook(lambda module, inputs, output: captured.append(output))
    network.eval().to(device)
    features = []
    try:
        for volume in volumes:
            captured.clear()
            network(volume[None].float().to(device))
            activation = captured[-1]
            features.append(activation.float().flatten(2).mean(-1)[0].cpu())
    finally:
        hook.remove()
    if len(features) < 2:
        raise BadInputError("Distribution metrics need at least 2 volumes per set.")
    return torch.stack(features)


def frechet_distance(real_features: torch.Tensor, generated_features: torch.Tensor) -> float:
    """FID between two ``(N, F)`` feature sets (MONAI ``FIDMetric``)."""
    return float(FIDMetric()(generated_features.double(), real_features.double()))


def maximum_mean_discrepancy(real: torch.Tensor, generated: torch.Tensor) -> float:
    """Squared MMD (MONAI ``MMDMetric``, linear kernel, unbiased so it can dip below 0) between two batches
    of volumes ``(N, C, D, H, W)``."""
    return float(MMDMetric()(generated.float(), real.float()).mean())


def ms_ssim_3d(image: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0, kernel_size: int = 3) -> float:
    """Multi-scale SSIM of two ``(D, H, W)`` volumes (5 scales; each side needs ``16 * kernel_size`` voxels)."""
    minimum = 16 * kernel_size  # MONAI's check: side // (scales - 1)**2 > kernel_size - 1
    if min(image.shape) < minimum:
        raise BadInputError(f"MS-SSIM with kernel {kernel_size} needs every side >= {minimum} voxels; got {tuple(image.shape)}.")
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=data_range, kernel_size=kernel_size)
    return float(metric(image.float()[None, None], reference.float()[None, None]).mean())
