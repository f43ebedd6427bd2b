"""Organ masks as ControlNet conditions (MRGen, spec B.4/B.5/B.9) on 3D label maps.

Two encodings of a label map with organs ``1..N`` (organ ``j`` = label value ``j``):

- ``"one-hot"`` (MedGen default, recommended in 3D by spec B.9): ``N`` channels, channel ``j-1`` is
  ``+1`` inside organ ``j`` and ``-1`` elsewhere, i.e. ``2 * m_j - 1``.
- ``"merged"`` (MRGen's shipped 1-channel encoding): ``2 * sum_j w_j * m_j - 1``; background is
  exactly ``-1``, overlapping organs add up. CHAOS uses :data:`CHAOS_WEIGHTS`.

Both encodings put every background voxel at ``-1``, so "no mask" (a target-modality training sample,
which has no labels) is the same constant tensor in both: all channels ``-1``
(:func:`empty_control`), which is MRGen's "mask set to all -1".
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.utils import convert_to_tensor

from medgen.errors import BadInputError

#: MRGen's merged-mask weights for CHAOS (liver, right kidney, left kidney, spleen): single-organ
#: values -0.4, 0.0, -0.2, +0.2
CHAOS_WEIGHTS = (0.3, 0.5, 0.4, 0.6)

#: MRGen skips a conditioning mask whose foreground fraction is <= this (spec B.5 step 1)
MASK_THRESHOLD = 0.005

#: the control value of background voxels, and of every voxel of an empty ("no mask") control
BACKGROUND_VALUE = -1.0

ENCODINGS = ("one-hot", "merged")


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor without MONAI metadata (controls are network inputs, not volumes on a grid)."""
    return convert_to_tensor(tensor, track_meta=False)


def check_label_map(label: torch.Tensor, num_organs: int) -> torch.Tensor:
    """The label map as a plain int64 ``(1, I, J, K)`` tensor; :class:`BadInputError` unless its values lie in 0..N."""
    label = _plain(label)
    if label.ndim != 4 or label.shape[0] != 1:
        raise BadInputError(f"A label map must have shape (1, I, J, K); got {tuple(label.shape)}.")
    if label.is_floating_point() and not torch.equal(label, label.round()):
        raise BadInputError("The label map holds non-integer values: pass an integer label map (0 = background).")
    label = label.long()
    if label.numel() and (label.min() < 0 or label.max() > num_organs):
        raise BadInputError(
            f"Label values must lie in 0..{num_organs} (0 = background, j = organ j); "
            f"found {label.min().item()}..{label.max().item()}. Check the number of organs."
        )
    return label


def _check_encoding(encoding: str) -> None:
    if encoding not in ENCODINGS:
        raise BadInputError(f"Unknown control encoding {encoding!r}; use one of {ENCODINGS}.")


def default_weights(num_organs: int) -> tuple[float, ...]:
    """Merged-mask weights ``j / N``: distinct single-organ values, and ``w = 1`` for one organ as in MRGen."""
    return tuple(j / num_organs for j in range(1, num_organs + 1))


def organ_masks(label: torch.Tensor, num_organs: int) -> torch.Tensor:
    """Binary organ masks of a label map.

    Args:
        label: integer label map ``(1, I, J, K)`` with values in ``0..num_organs``.
        num_organs: ``N``.

    Returns:
        float ``(N, I, J, K)`` in {0, 1}; channel ``j-1`` is organ ``j``.
    """
    label = check_label_map(label, num_organs)
    values = torch.arange(1, num_organs + 1, device=label.device).view(-1, 1, 1, 1)
    return (label == values).float()


def merged_mask(masks: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """MRGen's one-channel merged mask ``2 * sum_j w_j * m_j - 1``.

    Args:
        masks: organ masks ``(N, I, J, K)`` in {0, 1} (may overlap).
        weights: ``N`` positive weights.

    Returns:
        float ``(1, I, J, K)``: background exactly -1, organ ``j`` alone ``2 w_j - 1``, overlaps add up.
    """
    masks = _plain(masks)
    if masks.ndim != 4 or masks.shape[0] != len(weights):
        raise BadInputError(f"Expected {len(weights)} organ masks (N, I, J, K) for {len(weights)} weights; got {tuple(masks.shape)}.")
    weight = torch.as_tensor(weights, dtype=torch.float32, device=masks.device).view(-1, 1, 1, 1)
    return 2.0 * (masks.float() * weight).sum(dim=0, keepdim=True) - 1.0


def decode_merged_mask(merged: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Invert :func:`merged_mask` for non-overlapping organs by the nearest single-organ value.

    Args:
        merged: ``(1, I, J, K)`` merged mask (e.g. after nearest-neighbour resampling).
        weights: the ``N`` weights it was encoded with; their values ``2 w_j - 1`` must be distinct
            from each other and from the background -1.

    Returns:
        float ``(N, I, J, K)`` one-hot organ masks (a voxel nearest to -1 is background).
    """
    levels = [BACKGROUND_VALUE] + [2.0 * w - 1.0 for w in weights]
    if len(set(levels)) != len(levels):
        raise BadInputError(f"Weights {tuple(weights)} give repeated mask values {levels}; the organs cannot be told apart.")
    merged = _plain(merged)
    level = torch.as_tensor(levels, dtype=torch.float32, device=merged.device).view(-1, 1, 1, 1)
    nearest = (merged.float() - level).abs().argmin(dim=0)
    values = torch.arange(1, len(levels), device=merged.device).view(-1, 1, 1, 1)
    return (nearest.unsqueeze(0) == values).float()


def one_hot_control(label: torch.Tensor, num_organs: int) -> torch.Tensor:
    """One channel per organ, ``+1`` inside and ``-1`` outside: float ``(N, I, J, K)``."""
    return 2.0 * organ_masks(label, num_organs) - 1.0


def control_channels(num_organs: int, encoding: str = "one-hot") -> int:
    """Channels of the control tensor: ``N`` for one-hot, 1 for merged."""
    _check_encoding(encoding)
    return num_organs if encoding == "one-hot" else 1


def control_tensor(
    label: torch.Tensor, num_organs: int, encoding: str = "one-hot", weights: Sequence[float] | None = None
) -> torch.Tensor:
    """The ControlNet condition of a label map.

    Args:
        label: integer label map ``(1, I, J, K)``, values in ``0..num_organs``.
        num_organs: ``N``.
        encoding: ``"one-hot"`` or ``"merged"``.
        weights: merged-mask weights (default :func:`default_weights`); ignored for one-hot.

    Returns:
        float ``(C, I, J, K)`` in [-1, 1] (merged overlaps may exceed 1), ``C = control_channels(N, encoding)``.
    """
    _check_encoding(encoding)
    if encoding == "one-hot":
        return one_hot_control(label, num_organs)
    weights = default_weights(num_organs) if weights is None else tuple(weights)
    if len(weights) != num_organs:
        raise BadInputError(f"Merged encoding needs one weight per organ ({num_organs}); got {len(weights)}.")
    return merged_mask(organ_masks(label, num_organs), weights)


def empty_control(shape: Sequence[int], num_organs: int, encoding: str = "one-hot") -> torch.Tensor:
    """The "no mask" condition of a target-modality sample: all channels at -1, ``(C, *shape)``.

    Args:
        shape: spatial shape ``(I, J, K)``.
    """
    return torch.full((control_channels(num_organs, encoding), *shape), BACKGROUND_VALUE)


def label_from_organ_masks(masks: torch.Tensor) -> torch.Tensor:
    """Integer label map ``L = max_j j * [m_j > 0]`` of ``(N, I, J, K)`` masks (overlap -> larger id, spec B.6).

    Returns:
        int64 ``(1, I, J, K)``.
    """
    masks = _plain(masks)
    if masks.ndim != 4:
        raise BadInputError(f"Organ masks must have shape (N, I, J, K); got {tuple(masks.shape)}.")
    if masks.shape[0] == 0:
        return torch.zeros((1, *masks.shape[1:]), dtype=torch.int64, device=masks.device)
    ids = torch.arange(1, masks.shape[0] + 1, device=masks.device).view(-1, 1, 1, 1)
    return torch.where(masks > 0, ids, torch.zeros_like(ids)).amax(dim=0, keepdim=True).long()


def foreground_fraction(label: torch.Tensor) -> float:
    """Fraction of voxels with a non-zero label (compare with :data:`MASK_THRESHOLD`)."""
    label = _plain(label)
    return float((label != 0).float().mean()) if label.numel() else 0.0
