"""Per-class Dice and 95th-percentile Hausdorff distance of label maps (MONAI metrics)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot

from medgen.errors import BadInputError
from medgen.io.validation import holds_whole_numbers


def _one_hot_pair(prediction: torch.Tensor, reference: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both label maps (any spatial dimensions) one-hot as ``(1, num_classes, *spatial)``.

    Raises:
        BadInputError: shapes that differ, or voxels that are not whole numbers in ``[0, num_classes)`` (NaN included).
    """
    if prediction.shape != reference.shape:
        raise BadInputError(f"Prediction {tuple(prediction.shape)} and reference {tuple(reference.shape)} differ in shape.")
    pair = []
    for name, labels in (("prediction", prediction), ("reference", reference)):
        labels = _label_values(labels, name)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise BadInputError(f"The {name} label map must hold class numbers 0..{num_classes - 1}; found "
                                f"{int(labels.min())}..{int(labels.max())}.")
        pair.append(one_hot(labels.reshape(1, 1, *labels.shape), num_classes, dim=1))
    return pair[0], pair[1]


def _label_values(labels: torch.Tensor, name: str) -> torch.Tensor:
    """A label map as a plain int64 tensor; float maps must hold whole numbers (NaN is refused, not cast)."""
    labels = torch.as_tensor(labels)
    labels = labels.as_tensor() if hasattr(labels, "as_tensor") else labels
    if not holds_whole_numbers(labels):
        raise BadInputError(f"The {name} label map holds values that are not whole numbers (or NaN).")
    return labels.long()


def _voxel_counts(one_hot_labels: torch.Tensor) -> torch.Tensor:
    """Voxels per class of a ``(1, C, *spatial)`` one-hot map: ``(C,)``."""
    return one_hot_labels.sum(dim=(0, *range(2, one_hot_labels.ndim)))


def dice_per_class(prediction: torch.Tensor, reference: torch.Tensor, num_classes: int) -> np.ndarray:
    """Dice of every class 0..num_classes-1 between two integer label maps ``(I, J, K)`` (or 2D ``(I, J)``).

    A class absent from both maps scores 1 (perfect agreement on "nothing"), absent from one scores 0.
    """
    pred_1h, ref_1h = _one_hot_pair(prediction, reference, num_classes)
    dice = compute_dice(pred_1h, ref_1h, include_background=True, ignore_empty=False)[0]
    both_empty = (_voxel_counts(pred_1h) == 0) & (_voxel_counts(ref_1h) == 0)
    return torch.where(both_empty, torch.ones_like(dice), dice).cpu().numpy()


def hd95_per_class(prediction: torch.Tensor, reference: torch.Tensor, num_classes: int, spacing_mm=None) -> np.ndarray:
    """95th-percentile symmetric Hausdorff distance (mm with ``spacing_mm``, else voxels) per foreground class.

    ``spacing_mm`` is in the maps' axis order (I, J, K). The distance is the larger of the two directed 95th
    percentiles (MONAI's definition). Returns ``num_classes - 1`` values (classes 1..K-1); NaN where either map
    lacks the class.
    """
    pred_1h, ref_1h = _one_hot_pair(prediction, reference, num_classes)
    distance = compute_hausdorff_distance(pred_1h, ref_1h, include_background=False, percentile=95, spacing=spacing_mm)[0]
    empty = (_voxel_counts(pred_1h)[1:] == 0) | (_voxel_counts(ref_1h)[1:] == 0)
    return torch.where(empty, torch.full_like(distance, float("nan")), distance).cpu().numpy()


def dice_with_convention(
    prediction: torch.Tensor, reference: torch.Tensor, labels: dict[str, int | Sequence[int]]
) -> dict[str, float]:
    """Dice per named structure of two integer label maps, with MRGen's evaluation convention (spec B.6).

    A structure given as several label values (e.g. ``"kidney": (2, 3)``) is their union. Both maps
    empty for a structure -> 1; reference empty but prediction not -> 0.

    Args:
        prediction, reference: integer label maps of one shape (any number of dimensions).
        labels: structure name -> label value or values.
    """
    prediction = _label_values(prediction, "prediction")
    reference = _label_values(reference, "reference").to(prediction.device)
    if prediction.shape != reference.shape:
        raise BadInputError(f"Prediction {tuple(prediction.shape)} and reference {tuple(reference.shape)} differ in shape.")
    scores = {}
    for name, values in labels.items():
        ids = torch.as_tensor(np.atleast_1d(values).astype(np.int64), device=prediction.device)
        predicted, expected = torch.isin(prediction, ids), torch.isin(reference, ids)
        total = int(predicted.sum()) + int(expected.sum())
        overlap = int((predicted & expected).sum())
        scores[name] = 1.0 if total == 0 else 2.0 * overlap / total
    return scores
