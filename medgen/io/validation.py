"""Checks on volumes with messages a user can act on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medgen.errors import BadInputError, GeometryMismatchError

#: tolerances for comparing voxel grids: spacing/origin in mm, direction cosines unitless
GEOMETRY_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-4


def geometry_of(volume) -> dict:
    """Shape ``(I, J, K)``, spacing (mm), origin (RAS mm) and direction (3x3, columns = axes)."""
    affine = np.asarray(volume.affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    return {
        "shape": tuple(int(s) for s in volume.shape[-3:]),
        "spacing_mm": spacing,
        "origin_ras_mm": affine[:3, 3].copy(),
        "direction": affine[:3, :3] / spacing,
    }


def _describe(geometry: dict) -> str:
    spacing = ", ".join(f"{v:.4g}" for v in geometry["spacing_mm"])
    origin = ", ".join(f"{v:.4g}" for v in geometry["origin_ras_mm"])
    return f"shape {geometry['shape']}, spacing ({spacing}) mm, origin ({origin})"


def check_same_geometry(first, second, first_name: str = "image", second_name: str = "label") -> None:
    """Raise :class:`GeometryMismatchError` unless both volumes share one voxel grid.

    Args:
        first, second: MetaTensors shaped ``(C, I, J, K)`` with RAS affines.
        first_name, second_name: names used in the message (file names are best).
    """
    a, b = geometry_of(first), geometry_of(second)
    problems = []
    if a["shape"] != b["shape"]:
        problems.append("shape")
    if not np.allclose(a["spacing_mm"], b["spacing_mm"], atol=GEOMETRY_ATOL_MM):
        problems.append("spacing")
    if not np.allclose(a["origin_ras_mm"], b["origin_ras_mm"], atol=GEOMETRY_ATOL_MM):
        problems.append("origin")
    if not np.allclose(a["direction"], b["direction"], atol=DIRECTION_ATOL):
        problems.append("direction")
    if problems:
        raise GeometryMismatchError(
            f"{first_name} and {second_name} must share one voxel grid but differ in {', '.join(problems)}: "
            f"{first_name} has {_describe(a)}; {second_name} has {_describe(b)}. "
            f"Resample {second_name} onto {first_name} (nearest neighbour for label maps) first."
        )


def check_spatial_3d(array_shape: tuple[int, ...], name: str) -> None:
    """Raise unless ``array_shape`` is ``(C, I, J, K)`` with every spatial size > 1."""
    if len(array_shape) != 4 or min(array_shape[1:]) < 2:
        raise BadInputError(
            f"{name} must be a 3D volume (at least 2 voxels along each of 3 axes) but has shape "
            f"{tuple(array_shape)} (channels first). Load a 3D scan, not a 2D slice or a 4D series."
        )


def check_finite(volume: torch.Tensor, name: str) -> None:
    """Raise :class:`BadInputError` if ``volume`` holds NaN or infinite values."""
    if volume.is_floating_point():
        bad = int((~torch.isfinite(volume)).sum())
        if bad:
            raise BadInputError(
                f"{name} contains {bad} NaN or infinite voxel(s) out of {volume.numel()}. "
                "Fix or mask them (e.g. replace with 0) before running MedGen."
            )


def holds_whole_numbers(values: torch.Tensor) -> bool:
    """True for an integer tensor, or a float tensor whose every value is a whole number (NaN is not): what a label
    map may hold."""
    return not values.is_floating_point() or bool(torch.all(values == values.round()))


def display_name(volume: torch.Tensor, fallback: str) -> str:
    """The file name a loaded volume came from (``load_volume`` records it), for error messages; ``fallback``
    for tensors that were not read from a file."""
    source = volume.meta.get("filename_or_obj") if isinstance(getattr(volume, "meta", None), dict) else None
    return Path(str(source)).name if source else fallback


def check_not_constant(volume: torch.Tensor, name: str, purpose: str) -> None:
    """:class:`BadInputError` if every voxel of ``volume`` has one value (``purpose`` says what needs contrast)."""
    low, high = float(volume.min()), float(volume.max())
    if low == high:
        raise BadInputError(f"{name} is constant (every voxel {low:g}): it has no contrast {purpose}. Pick another volume.")


def nearest_multiple_shape(shape, multiple: int) -> tuple[int, ...]:
    """Each size of ``shape`` rounded to the nearest positive multiple of ``multiple``: the shape an error
    message suggests when a network needs sizes it can halve exactly."""
    return tuple(max(multiple, round(size / multiple) * multiple) for size in shape)
