"""Volume files <-> geometry-carrying tensors (the only place that touches image files), atomic
writes, and the ``medgen_model.json`` of generative model folders.

Tensors are ``monai.data.MetaTensor`` shaped ``(C, I, J, K)`` whose ``affine`` maps voxel indices
(i, j, k) to RAS millimetres, exactly Slicer's IJK-to-RAS matrix.

Names are imported lazily so ``medgen.io.atomic`` and ``medgen.io.model_folder`` stay usable without
torch/MONAI installed.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "atomic_output": "medgen.io.atomic",
    "write_text_atomic": "medgen.io.atomic",
    "MODEL_JSON": "medgen.io.model_folder",
    "model_config": "medgen.io.model_folder",
    "read_model_json": "medgen.io.model_folder",
    "write_model_json": "medgen.io.model_folder",
    "scale_to_unit": "medgen.io.intensity",
    "SUPPORTED_SUFFIXES": "medgen.io.volumes",
    "axis_codes": "medgen.io.volumes",
    "oriented": "medgen.io.volumes",
    "load_volume": "medgen.io.volumes",
    "save_volume": "medgen.io.volumes",
    "volume_stem": "medgen.io.volumes",
    "volume_suffix": "medgen.io.volumes",
    "check_finite": "medgen.io.validation",
    "holds_whole_numbers": "medgen.io.validation",
    "check_not_constant": "medgen.io.validation",
    "check_same_geometry": "medgen.io.validation",
    "check_spatial_3d": "medgen.io.validation",
    "display_name": "medgen.io.validation",
    "geometry_of": "medgen.io.validation",
    "nearest_multiple_shape": "medgen.io.validation",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'medgen.io' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
