"""Straightforward unfold-based port of the released MIDiffusion LMI (``statistical_align``).

This is the baseline of ``bench/bench_lmi.py`` and the oracle the tests compare the fast operator
(:func:`medgen.translate.lmi.lmi_map`) against. It follows the released structure on purpose:
unfold the padded images into windows (compat: zero padding as released; clean: replicate
padding), build the candidate windows by unfolding again
(compat: the released double unfold of the window-expanded image, which produces quirk Q1;
clean: true windows centred at u+δ), evaluate the kernel on every sample of every
(voxel, candidate) pair, take each joint histogram as a (K×n)·(n×K) matmul, and keep the best
candidate. The only addition is chunking over the first two spatial axes: the released code
holds every pair at once, which does not fit in memory beyond small 2D images.
"""

from __future__ import annotations

import torch

from medgen.progress import Reporter, as_reporter
from medgen.translate.lmi_core import (
    DEFAULT_SIGMA,
    EPSILON,
    LmiSettings,
    candidate_displacements,
    check_volume_pair,
    kernel_values,
    marginal_entropy,
    mutual_information_score,
    offsets_from_candidates,
    pick_best_candidate,
    to_kernel_units,
)


def _pair_floats(n_samples: int, bins: int) -> int:
    """Floats held per (voxel, candidate) pair while a chunk is scored: two n×K kernels, about two
    n×K temporaries while they are built, and the K×K joint with about two temporaries."""
    return 4 * n_samples * bins + 3 * bins * bins


def _unfold_windows(volume: torch.Tensor, window: int, padding: int, mode: str = "constant") -> torch.Tensor:
    """Pad every spatial axis by ``padding`` and unfold windows of edge ``window`` (a view).

    Args:
        volume: ``(B, 1, *spatial)``.
        mode: ``torch.nn.functional.pad`` mode: "constant" (zeros, compat) or "replicate" (clean).

    Returns:
        ``(B, 1, *positions, *window_axes)`` with one window per position.
    """
    ndim = volume.dim() - 2
    padded = torch.nn.functional.pad(volume, (padding,) * (2 * ndim), mode=mode)
    for axis in range(ndim):
        padded = padded.unfold(2 + axis, window, 1)
    return padded


def _compat_candidate_windows(moving: torch.Tensor, window: int) -> torch.Tensor:
    """Candidate windows of the released code: ``(B, *spatial, *candidate_axes, *window_axes)`` view.

    The released code tiles each window into a p^d block of an enlarged image, unfolds that image
    again and reads the block-strided windows; a displaced axis therefore samples [u, u+d, u]
    instead of [u+d-1, u+d, u+d+1] (quirk Q1).
    """
    ndim = moving.dim() - 2
    half = window // 2
    windows = _unfold_windows(moving, window, half)  # (B, 1, *L, *p)
    # interleave (L_d, p) pairs: (B, 1, L0, p, L1, p, ...) -> enlarged image (B, 1, p·L0, p·L1, ...)
    order = [0, 1] + [axis for d in range(ndim) for axis in (2 + d, 2 + ndim + d)]
    enlarged = windows.permute(order).reshape(moving.shape[:2] + tuple(window * n for n in moving.shape[2:]))
    rewindowed = _unfold_windows(enlarged, window, half)  # (B, 1, p·L0, ..., p, ...)
    for axis in range(ndim):
        rewindowed = rewindowed.unflatten(2 + 2 * axis, (moving.shape[2 + axis], window))
    # now (B, 1, L0, X0, L1, X1, ..., a0, a1, ...): move candidate axes after the spatial ones
    spatial_axes = [1 + 2 * d for d in range(ndim)]
    candidate_axes = [2 + 2 * d for d in range(ndim)]
    window_axes = list(range(1 + 2 * ndim, 1 + 3 * ndim))
    return rewindowed[:, 0].permute([0] + spatial_axes + candidate_axes + window_axes)


def _clean_candidate_windows(moving: torch.Tensor, window: int, radius: int) -> torch.Tensor:
    """True displaced windows: ``(B, *spatial, *candidate_axes, *window_axes)`` view, window centred at u+δ."""
    ndim = moving.dim() - 2
    windows = _unfold_windows(moving, window, window // 2 + radius, "replicate")  # positions cover u+δ for all δ
    for axis in range(ndim):
        windows = windows.unfold(2 + axis, 2 * radius + 1, 1)
    # (B, 1, *L, *p, *q) -> (B, *L, *q, *p)
    spatial_axes = list(range(1, 1 + ndim))
    window_axes = list(range(1 + ndim, 1 + 2 * ndim))
    candidate_axes = list(range(1 + 2 * ndim, 1 + 3 * ndim))
    return windows[:, 0].permute([0] + spatial_axes + candidate_axes + window_axes)


def _released_joint_entropy(source_kernels: torch.Tensor, moving_kernels: torch.Tensor) -> torch.Tensor:
    """Joint entropy in bits exactly as the released code: matmul, normalise with ε, -Σ p·log2(p+ε)."""
    joint = torch.matmul(source_kernels.transpose(1, 2), moving_kernels)
    joint = joint / (joint.sum(dim=(1, 2)).view(-1, 1, 1) + EPSILON)
    return -(joint * torch.log2(joint + EPSILON)).sum(dim=(1, 2))


def lmi_map_reference(
    source: torch.Tensor,
    moving: torch.Tensor,
    *,
    window: int = 3,
    radius: int = 1,
    bins: int = 27,
    sigma: float = DEFAULT_SIGMA,
    normalize: bool = True,
    compat: bool = False,
    memory_budget_mb: float = 1024.0,
    reporter: Reporter | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfold-based LMI map; same arguments and outputs as :func:`medgen.translate.lmi.lmi_map`.

    Slow and memory-hungry (every pair materialises n×K kernels): use it as an oracle on small
    volumes and as the benchmark baseline. ``memory_budget_mb`` bounds only the per-chunk pair
    tensors (≈ 4·(4·n·K + 3·K²) bytes per voxel-candidate pair), not the unfolded views' base.
    """
    settings = LmiSettings(window, radius, bins, sigma, normalize, compat)
    ndim = check_volume_pair(source, moving)
    reporter = as_reporter(reporter)
    source_units = to_kernel_units(source, settings)
    moving_units = to_kernel_units(moving, settings)
    source_windows = _unfold_windows(source_units, window, window // 2, "constant" if compat else "replicate")[:, 0]  # (B, *L, *p)
    if compat:
        candidate_windows = _compat_candidate_windows(moving_units, window)
    else:
        candidate_windows = _clean_candidate_windows(moving_units, window, radius)
    displacements = candidate_displacements(ndim, settings)
    n_candidates, n_samples = displacements.shape[0], window**ndim

    batch, spatial = source.shape[0], tuple(source.shape[2:])
    lmi = torch.empty((batch, *spatial), dtype=torch.float32, device=source.device)
    best_index = torch.empty((batch, *spatial), dtype=torch.long, device=source.device)
    # chunk = a block of rows (second spatial axis) of one slice (first spatial axis) of one item
    pair_bytes = 4 * _pair_floats(n_samples, bins)
    voxels_per_row = 1 if ndim == 2 else spatial[2]
    rows_per_chunk = max(1, int(memory_budget_mb * 2**20 // (pair_bytes * n_candidates * voxels_per_row)))
    blocks = [
        (item, index, row)
        for item in range(batch)
        for index in range(spatial[0])
        for row in range(0, spatial[1], rows_per_chunk)
    ]
    zero_index = n_candidates // 2  # the centre of the symmetric raster of displacements
    for step, (item, index, row) in enumerate(blocks):
        reporter.check_cancelled()
        rows = slice(row, row + rows_per_chunk)
        candidate_block = candidate_windows[item, index, rows]  # (rows, [W,] *q, *p)
        block_shape = candidate_block.shape[: ndim - 1]
        source_samples = source_windows[item, index, rows].reshape(-1, 1, n_samples)
        source_samples = source_samples.expand(-1, n_candidates, -1).reshape(-1, n_samples)
        source_kernels = kernel_values(source_samples, settings)  # (pairs, n, K)
        moving_kernels = kernel_values(candidate_block.reshape(-1, n_samples), settings)
        scores = mutual_information_score(
            marginal_entropy(source_kernels),
            marginal_entropy(moving_kernels),
            _released_joint_entropy(source_kernels, moving_kernels),
            normalize,
        )
        best, index_of_best = pick_best_candidate(scores.view(*block_shape, n_candidates), zero_index, not compat)
        lmi[item, index, rows] = best
        best_index[item, index, rows] = index_of_best
        reporter.progress("lmi_reference", step + 1, len(blocks))
    return lmi.unsqueeze(1), offsets_from_candidates(best_index, displacements)
