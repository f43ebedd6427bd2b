"""Distribution metrics of generated volumes: FID on pluggable 3D features, MMD, MS-SSIM (MONAI).

No feature network is downloaded at run time: FID uses features from a network the caller supplies
(a :class:`FeatureNetwork`: any ``nn.Module``, one of its layers and where its weights came from),
typically the base model's own encoder; :func:`fid_report` says which network, layer and weights
produced the features.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Sequence

import torch
from monai.metrics import MultiScaleSSIMMetric
from torch import nn

from medgen.errors import BadInputError
from medgen.metrics.images import volume_pair


#: runs the feature network on one batch ``(1, C, D, H, W)``; e.g. a DDPM UNet also needs its timestep
Forward = Callable[[nn.Module, torch.Tensor], Any]


def call_network(network: nn.Module, batch: torch.Tensor) -> Any:
    """The default :data:`Forward`: ``network(batch)``."""
    return network(batch)


@torch.no_grad()
def layer_features(network: nn.Module, layer: str, volumes: Iterable[torch.Tensor], device: torch.device | str = "cpu",
                   forward: Forward = call_network) -> torch.Tensor:
    """Global-average-pooled activations of ``network.<layer>`` for each volume.

    Args:
        network: feature network (eval mode is set here).
        layer: dotted module name, e.g. ``"encoder.3"`` (see ``network.named_modules()``).
        volumes: tensors ``(C, D, H, W)`` in the network's input convention.
        forward: how to run ``network`` on a ``(1, C, D, H, W)`` batch (default: ``network(batch)``).

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
            forward(network, volume[None].float().to(device))
            activation = captured[-1]
            if isinstance(activation, (tuple, list)):  # a block that also returns its skips: its first output
                activation = activation[0]
            if not isinstance(activation, torch.Tensor) or activation.ndim < 2:
                raise BadInputError(f"Layer {layer!r} does not output a feature tensor (B, F, ...); name another layer.")
            pooled = activation if activation.ndim == 2 else activation.flatten(2).mean(-1)  # (1, F) already pooled
            features.append(pooled.float()[0].cpu())
    finally:
        hook.remove()
    if len(features) < 2:
        raise BadInputError("Distribution metrics need at least 2 volumes per set.")
    return torch.stack(features)


def frechet_distance(real_features: torch.Tensor, generated_features: torch.Tensor) -> float:
    """FID between two ``(N, F)`` feature sets: |μ₁ - μ₂|² + Tr(Σ₁ + Σ₂ - 2 (Σ₁Σ₂)^½), unbiased covariances, float64.

    Written here rather than MONAI's ``FIDMetric``: with fewer volumes than features (the few-shot case) the
    covariances are singular, ``scipy.linalg.sqrtm`` of their product returns a small imaginary part, and MONAI's
    fixed 1e-3 tolerance on it raised in 6 of 40 draws of 4 vs 4 volumes with 64 features (measured). The trace of
    (Σ₁Σ₂)^½ is taken as the sum of square roots of the eigenvalues of Σ₁^½ Σ₂ Σ₁^½, a symmetric matrix with the
    same spectrum, so no complex arithmetic is needed; rounding below 0 is clipped, the FID included.

    Raises:
        BadInputError: not two ``(N, F)`` sets with the same F and N >= 2 each (one sample has no covariance).
    """
    for what, features in (("real", real_features), ("generated", generated_features)):
        if features.ndim != 2 or features.shape[0] < 2:
            raise BadInputError(f"FID needs (N, F) features with N >= 2 per set; the {what} set is {tuple(features.shape)}.")
    if real_features.shape[1] != generated_features.shape[1]:
        raise BadInputError(f"FID compares features of one network; got {real_features.shape[1]} and "
                            f"{generated_features.shape[1]} features per volume.")
    real, generated = real_features.double(), generated_features.double()
    mean_gap = real.mean(0) - generated.mean(0)
    real_cov, generated_cov = torch.atleast_2d(torch.cov(real.T)), torch.atleast_2d(torch.cov(generated.T))
    values, vectors = torch.linalg.eigh(real_cov)
    real_root = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    product = real_root @ generated_cov @ real_root
    trace_root = torch.linalg.eigvalsh((product + product.T) / 2).clamp(min=0).sqrt().sum()
    fid = mean_gap @ mean_gap + torch.trace(real_cov) + torch.trace(generated_cov) - 2 * trace_root
    return max(float(fid), 0.0)


@dataclasses.dataclass(frozen=True)
class FeatureNetwork:
    """The network whose activations FID compares, and what the report says about it.

    Args:
        network: a local network (nothing is downloaded).
        layer: dotted name of the module whose output is pooled into features (see :func:`bottleneck_layer`).
        name: what the report calls the network (e.g. the model's name).
        weights: where its weights came from (e.g. ``"model folder /data/unet, SHA-256 1f2e..."``).
        source: ``"base model"`` (its own encoder, the default) or ``"user-supplied"``.
        forward: how to run it on a ``(1, C, D, H, W)`` batch (see :func:`layer_features`).
    """

    network: nn.Module
    layer: str
    name: str
    weights: str
    source: str = "base model"
    forward: Forward = call_network

    def features(self, volumes: Iterable[torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
        """``(N, F)`` pooled activations of :attr:`layer` (see :func:`layer_features`)."""
        return layer_features(self.network, self.layer, volumes, device, self.forward)

    def describe(self) -> dict[str, str]:
        """The report's ``feature_network`` entry: name, layer, weights and source."""
        return {"name": self.name, "layer": self.layer, "weights": self.weights, "source": self.source}


@torch.no_grad()
def bottleneck_layer(network: nn.Module, example: torch.Tensor, forward: Forward = call_network) -> str:
    """The default feature layer: the bottleneck convolution, where activations are coarsest.

    One forward pass on ``example`` ``(C, D, H, W)`` records every convolution's output grid. In an
    encoder-decoder the first run of convolutions at the smallest grid holds the end of the encoder, the
    bottleneck and the start of the decoder (a DDPM UNet's last down block, middle block and first up
    block), so the layer is the convolution in the middle of that run. Where another layer suits the data
    better, name it (the evaluate job's ``feature_layer``).

    Raises:
        BadInputError: the network runs no 3D convolution on this input.
    """
    grids: list[tuple[str, int]] = []
    hooks = [module.register_forward_hook(lambda module, inputs, output, name=name: grids.append((name, output[0, 0].numel())))
             for name, module in network.named_modules() if isinstance(module, nn.Conv3d)]
    network.eval()
    try:
        forward(network, example[None].float().to(next(network.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    if not grids:
        raise BadInputError(f"{type(network).__name__} runs no Conv3d; name its feature layer explicitly.")
    smallest = min(voxels for _, voxels in grids)
    first = next(index for index, (_, voxels) in enumerate(grids) if voxels == smallest)
    last = first
    while last + 1 < len(grids) and grids[last + 1][1] == smallest:
        last += 1
    return grids[(first + last + 1) // 2][0]  # upper middle: a run of [encoder, bottleneck] gives the bottleneck


def fid_report(real: Sequence[torch.Tensor], generated: Sequence[torch.Tensor], feature_network: FeatureNetwork,
               device: torch.device | str = "cpu") -> dict[str, Any]:
    """FID of ``generated`` against ``real`` volumes ``(C, D, H, W)``, with the network that produced the features.

    Returns:
        ``{"fid", "real_count", "generated_count", "feature_network": {"name", "layer", "weights", "source",
        "feature_dim"}}``; with fewer volumes than ``feature_dim`` the covariances are singular and the FID is
        noisy, which the counts let a reader judge.
    """
    real_features = feature_network.features(real, device)
    generated_features = feature_network.features(generated, device)
    return {
        "fid": frechet_distance(real_features, generated_features),
        "real_count": len(real_features),
        "generated_count": len(generated_features),
        "feature_network": {**feature_network.describe(), "feature_dim": int(real_features.shape[1])},
    }


def maximum_mean_discrepancy(real: torch.Tensor, generated: torch.Tensor) -> float:
    """Unbiased squared MMD with the linear kernel (MONAI ``MMDMetric``'s definition; it can dip below 0) between
    two sets of volumes ``(N, C, D, H, W)`` and ``(M, C, D, H, W)``, N and M >= 2 and possibly different.

    Written here, in float64: MONAI's metric needs N = M and works in the inputs' precision, where its large kernel
    sums cancel (at 96³, float32 gave 0.75 against 0.079 in float64; measured).
    """
    x, y = real.double().flatten(1), generated.double().flatten(1)
    if len(x) < 2 or len(y) < 2 or real.shape[1:] != generated.shape[1:]:
        raise BadInputError(f"MMD needs at least 2 volumes per set, of one size; got {tuple(real.shape)} real and "
                            f"{tuple(generated.shape)} generated.")

    def mean_off_diagonal(kernel: torch.Tensor) -> torch.Tensor:
        return (kernel.sum() - kernel.diagonal().sum()) / (len(kernel) * (len(kernel) - 1))

    return float(mean_off_diagonal(x @ x.T) + mean_off_diagonal(y @ y.T) - 2 * (x @ y.T).mean())


def ms_ssim_3d(image: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0, kernel_size: int = 3) -> float:
    """Multi-scale SSIM of two ``(D, H, W)`` volumes (5 scales; each side needs ``16 * kernel_size`` voxels)."""
    minimum = 16 * kernel_size  # MONAI's check: side // (scales - 1)**2 > kernel_size - 1
    if min(torch.as_tensor(image).shape[-3:]) < minimum:
        raise BadInputError(f"MS-SSIM with kernel {kernel_size} needs every side >= {minimum} voxels; got {tuple(image.shape)}.")
    image, reference = volume_pair(image, reference)
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=data_range, kernel_size=kernel_size)
    return float(metric(image[None, None], reference[None, None]).mean())
