"""Shared pieces of the LMI (locale-based mutual information) operator of MIDiffusion.

The fast operator (:mod:`medgen.translate.lmi`) and the unfold-based port of the released code
(:mod:`medgen.translate.lmi_reference`) differ only in how they gather windows and build joint
histograms; settings, input checks, the Gaussian binning kernel, marginal entropies, the NMI
formula and the choice of the best displacement live here so that both compute the same thing.

MONAI has no local mutual-information layer (its ``GlobalMutualInformationLoss`` and
``LocalNormalizedCrossCorrelationLoss`` compute other quantities), so this is written by hand
from spec ``diffusion_methods.md`` A.3.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from medgen.errors import BadInputError

#: epsilon of the released code, used in every normaliser and inside log2(p + eps)
EPSILON = 1e-10
#: allowance for allocator, BLAS and thread-pool workspaces that no tensor accounts for
WORKSPACE_BYTES = 32 * 2**20
#: the released code maps [0,1] intensities to 0..255 before binning
COMPAT_INTENSITY_SCALE = 255.0
#: kernel standard deviation in [0,1] units equal to the released ``MIsigma: 2`` (2·σ² = 8 grey levels)
DEFAULT_SIGMA = 8.0 / 255.0


@dataclass(frozen=True)
class LmiSettings:
    """Parameters of one LMI map.

    Args:
        window: odd window edge p; a window holds p**ndim samples.
        radius: search radius; candidate displacements are {-radius..radius}**ndim. compat mode
            requires radius == window // 2 (the released code ties them).
        bins: number K of kernel-density bins, evenly spaced over the intensity range. The
            released code uses window**3 (27 for p=3, even in 2D; quirk Q6); compat mode requires it.
        sigma: standard deviation of the Gaussian binning kernel in [0,1] intensity units.
            The default 8/255 equals the released ``MIsigma: 2``, whose code uses 2·σ² = 8 grey
            levels as the width; for another released MIsigma s pass 2·s²/255.
        normalize: True gives NMI = 2·MI/(H(A)+H(B)) (the symmetric uncertainty), False raw MI in bits.
        compat: True reproduces the released 2D definition (see :func:`medgen.translate.lmi.lmi_map`).
    """

    window: int = 3
    radius: int = 1
    bins: int = 27
    sigma: float = DEFAULT_SIGMA
    normalize: bool = True
    compat: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or self.window < 1 or self.window % 2 == 0:
            raise BadInputError(
                f"LMI window must be an odd integer >= 1, got {self.window!r}; use 3 (the released value)."
            )
        if not isinstance(self.radius, int) or self.radius < 0:
            raise BadInputError(
                f"LMI search radius must be an integer >= 0, got {self.radius!r}; use 1 (the released value)."
            )
        if not isinstance(self.bins, int) or self.bins < 2:
            raise BadInputError(f"LMI bins must be an integer >= 2, got {self.bins!r}; use 27 (the released value).")
        if not self.sigma > 0:
            raise BadInputError(
                f"LMI kernel sigma must be > 0 (in [0,1] intensity units), got {self.sigma!r}; use 8/255."
            )
        if self.compat and self.radius != self.window // 2:
            raise BadInputError(
                f"compat mode searches exactly window//2 = {self.window // 2} voxels (the released code ties the "
                f"search to the window), got radius={self.radius}; set radius={self.window // 2} or compat=False."
            )
        if self.compat and self.bins != self.window**3:
            raise BadInputError(
                f"compat mode uses window**3 = {self.window ** 3} bins like the released code, got bins={self.bins}; "
                f"set bins={self.window ** 3} or compat=False."
            )


def check_volume_pair(source: torch.Tensor, moving: torch.Tensor) -> int:
    """Validate a (source, moving) pair and return its number of spatial dimensions (2 or 3).

    Raises:
        BadInputError: not tensors, not ``(B,1,H,W)``/``(B,1,D,H,W)``, different shapes, empty,
            or containing NaN/inf.
    """
    for name, volume in (("source", source), ("moving", moving)):
        if not isinstance(volume, torch.Tensor):
            raise BadInputError(f"LMI {name} must be a torch.Tensor, got {type(volume).__name__}.")
        if volume.dim() not in (4, 5) or volume.shape[1] != 1:
            raise BadInputError(
                f"LMI {name} must have shape (B,1,H,W) or (B,1,D,H,W), got {tuple(volume.shape)}; "
                "add the batch/channel axes with volume[None, None] or split channels."
            )
        if volume.numel() == 0:
            raise BadInputError(f"LMI {name} is empty (shape {tuple(volume.shape)}).")
        if volume.is_floating_point() and not bool(torch.isfinite(volume).all()):
            raise BadInputError(f"LMI {name} contains NaN or infinite values; clean or clamp the volume first.")
    if source.shape != moving.shape:
        raise BadInputError(
            f"LMI source and moving must have the same shape, got {tuple(source.shape)} and {tuple(moving.shape)}; "
            "resample them onto one grid first."
        )
    if source.device != moving.device:
        raise BadInputError(
            f"LMI source is on {source.device} but moving is on {moving.device}; move both to one device."
        )
    return source.dim() - 2


def to_kernel_units(volume: torch.Tensor, settings: LmiSettings) -> torch.Tensor:
    """Map a [0,1] volume to the intensity units the kernel is evaluated in (float32).

    compat: trunc(255·v), unclamped, like the released ``(x * 255).int()`` (quirk Q2 keeps
    out-of-range values). clean: clamp to [0,1] so noisy samples cannot leave the bin range.
    """
    volume = volume.float()
    if settings.compat:
        return torch.trunc(volume * COMPAT_INTENSITY_SCALE)
    return volume.clamp(0.0, 1.0)


def bin_centres(settings: LmiSettings, device: torch.device) -> torch.Tensor:
    """The K bin centres, evenly spaced over [0,255] (compat) or [0,1] (clean); shape (K,)."""
    top = COMPAT_INTENSITY_SCALE if settings.compat else 1.0
    return torch.linspace(0.0, top, settings.bins, device=device, dtype=torch.float32)


def kernel_values(values: torch.Tensor, settings: LmiSettings) -> torch.Tensor:
    """Gaussian kernel of every value against every bin centre.

    Args:
        values: intensities in kernel units (see :func:`to_kernel_units`), any shape ``S``.

    Returns:
        ``S + (K,)`` float32 tensor exp(-½((v - c_k)/h)²). The operation order is the released
        code's, so both implementations produce bit-identical kernel values.
    """
    width = settings.sigma * (COMPAT_INTENSITY_SCALE if settings.compat else 1.0)
    residuals = values.unsqueeze(-1) - bin_centres(settings, values.device)
    return torch.exp(-0.5 * (residuals / width).pow(2))


def histogram_entropy(histogram: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of unnormalised histograms ``(N, K)``: -Σ_k P(k)·log2(P(k)+ε), P = h / (Σ h + ε)."""
    pdf = histogram / (histogram.sum(dim=1, keepdim=True) + EPSILON)
    return -(pdf * torch.log2(pdf + EPSILON)).sum(dim=1)


def marginal_entropy(window_kernels: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of the kernel-density histogram (mean kernel over samples) of each window.

    Args:
        window_kernels: ``(N, n, K)`` kernel values of N windows of n samples.

    Returns:
        ``(N,)`` entropies.
    """
    return histogram_entropy(window_kernels.mean(dim=1))


def mutual_information_score(
    entropy_a: torch.Tensor, entropy_b: torch.Tensor, joint_entropy: torch.Tensor, normalize: bool
) -> torch.Tensor:
    """MI = H(A)+H(B)-H(A,B) in bits, or NMI = 2·(MI+ε)/(H(A)+H(B)+ε) when ``normalize``.

    With compat inputs far outside [0,1] all kernel values underflow, H(B) = H(A,B) = 0 and NMI
    becomes exactly 2 (quirk Q2); that artefact is kept on purpose for compat mode.
    """
    mutual_information = entropy_a + entropy_b - joint_entropy
    if normalize:
        return 2.0 * (mutual_information + EPSILON) / (entropy_a + entropy_b + EPSILON)
    return mutual_information


def candidate_displacements(ndim: int, settings: LmiSettings) -> torch.Tensor:
    """All searched displacements δ, shape ``(C, ndim)`` int64, raster order (axis 0 slowest).

    Raster order is the order the released max-pool scans candidates, which decides ties.
    """
    steps = range(-settings.radius, settings.radius + 1)
    return torch.tensor(list(itertools.product(steps, repeat=ndim)), dtype=torch.long)


def pick_best_candidate(scores: torch.Tensor, zero_index: int, prefer_zero: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Best score and its candidate index over the last axis.

    Args:
        scores: ``(..., C)`` scores of the C candidates.
        zero_index: index of the zero displacement among the candidates.
        prefer_zero: clean mode resolves ties toward δ = 0 (so flat regions report no
            displacement); compat keeps the released first-in-raster-order rule.

    Returns:
        ``(best, index)`` with shapes ``(...)``; index is int64.
    """
    best = scores.amax(dim=-1)
    # argmax documents returning the first of equal maxima, like the released max-pool scan
    index = scores.argmax(dim=-1)
    if prefer_zero:
        index = torch.where(scores[..., zero_index] >= best, torch.full_like(index, zero_index), index)
    return best, index


def offsets_from_candidates(candidate_index: torch.Tensor, displacements: torch.Tensor) -> torch.Tensor:
    """Turn per-voxel candidate indices ``(B, *spatial)`` into displacements ``(B, ndim, *spatial)`` int64."""
    offsets = displacements.to(candidate_index.device)[candidate_index]
    return offsets.movedim(-1, 1).contiguous()


def equal_share(total: int, largest: int) -> int:
    """Size of equal parts of ``total`` when no part may exceed ``largest``: a short last part would
    allocate odd sizes that fragment the host heap."""
    return -(-total // -(-total // largest))


def joint_entropy_bits(joint: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of each unnormalised joint histogram ``(N, K, K)`` of total ``mass``; overwrites ``joint``.

    Uses -Σ (J/Z)·ln(J/Z) = (Σ entr(J) + S·ln Z)/Z with S = Σ J and Z = S + ε (the released
    normaliser), which is one elementwise pass instead of the released four.
    """
    normaliser = mass + EPSILON
    plogp_sum = torch.special.entr(joint, out=joint).sum(dim=(1, 2))
    return (plogp_sum + mass * torch.log(normaliser)) / (normaliser * math.log(2.0))
