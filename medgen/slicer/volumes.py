"""Volume nodes <-> ``(C, I, J, K)`` MetaTensors and files, with exact IJK-to-RAS geometry.

A MetaTensor's affine *is* Slicer's IJK-to-RAS matrix, so the only work here is the KJI <-> IJK
axis order of ``slicer.util.arrayFromVolume`` and carrying the matrix across. The node's own
(local) IJK-to-RAS is used; results are placed under the reference node's parent transform, so a
transformed input stays aligned with its outputs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

from medgen.errors import BadInputError
from medgen.io import load_volume, save_volume
from medgen.slicer.scene import LABELMAP_CLASS, SCALAR_VOLUME_CLASS, place_next_to, remove_nodes, resolve_scene


def ijk_to_ras_of(node) -> np.ndarray:
    """The node's 4x4 IJK-to-RAS matrix (mm) as float64."""
    import slicer
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix).astype(np.float64)


def volume_node_to_tensor(node) -> MetaTensor:
    """Copy a scalar or label volume node to a MetaTensor shaped ``(1, I, J, K)``.

    Label map nodes give int64 tensors, other volumes float32.
    """
    import slicer

    if node is None or node.GetImageData() is None:
        raise BadInputError("The selected volume node has no image data. Load or select a volume first.")
    array_kji = slicer.util.arrayFromVolume(node)
    if array_kji.ndim != 3:
        raise BadInputError(
            f"Volume '{node.GetName()}' has {array_kji.shape[-1]} components per voxel; MedGen needs a scalar volume."
        )
    is_label = node.IsA(LABELMAP_CLASS)
    array_ijk = np.ascontiguousarray(array_kji.transpose(2, 1, 0))[None]
    data = torch.from_numpy(array_ijk.astype(np.int64 if is_label else np.float32))
    return MetaTensor(data, affine=torch.from_numpy(ijk_to_ras_of(node)), meta={"name": node.GetName(), "space": "RAS"})


def _label_array_dtype(array: np.ndarray) -> type:
    """int16 when the labels fit, else int32 (the widest label type Slicer's segment tools take).

    Raises:
        BadInputError: values that are not whole numbers, or beyond int32, which a cast would wrap silently.
    """
    if array.size and (not np.array_equal(array, np.round(array)) or array.min() < np.iinfo(np.int32).min
                       or array.max() > np.iinfo(np.int32).max):
        raise BadInputError(f"A label map for the scene holds values that are not whole numbers in the int32 range "
                            f"(from {array.min()} to {array.max()}); renumber its labels first.")
    return np.int16 if array.min() >= np.iinfo(np.int16).min and array.max() <= np.iinfo(np.int16).max else np.int32


def tensor_to_volume_node(volume: torch.Tensor, name: str, *, scene=None, label: bool = False, reference_node=None, affine=None):
    """Add a new volume node holding ``volume`` (``(1, I, J, K)`` or ``(I, J, K)``) to the scene.

    Args:
        volume: MetaTensor (its affine is used) or tensor with ``affine`` given (4x4 IJK-to-RAS, mm).
        name: node name; a name already in the scene gets a suffix (``name_1``), as Slicer's own importers do.
        scene: target scene (default ``slicer.mrmlScene``).
        label: create a ``vtkMRMLLabelMapVolumeNode`` with integer voxels.
        reference_node: place the new node next to this one (subject hierarchy, parent transform).
    """
    import slicer

    scene = resolve_scene(scene)
    if affine is None:
        if not isinstance(volume, MetaTensor):
            raise BadInputError("tensor_to_volume_node needs an affine: pass a MetaTensor or affine=4x4 matrix.")
        affine = volume.affine
    affine = np.asarray(affine.cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    data = volume.detach().cpu()
    data = data.as_tensor() if isinstance(data, MetaTensor) else data
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 3:
        raise BadInputError(f"Expected a single-channel 3D volume (1, I, J, K) but got shape {tuple(volume.shape)}.")
    array_kji = np.ascontiguousarray(data.numpy().transpose(2, 1, 0))
    array_kji = array_kji.astype(_label_array_dtype(array_kji)) if label else array_kji.astype(np.float32)
    node = scene.AddNewNodeByClass(LABELMAP_CLASS if label else SCALAR_VOLUME_CLASS, scene.GenerateUniqueName(name))
    try:
        slicer.util.updateVolumeFromArray(node, array_kji)
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(affine))
        node.CreateDefaultDisplayNodes()
        if reference_node is not None:
            place_next_to(node, reference_node)
    except Exception:
        remove_nodes(scene, node)  # never leave a half-made node in the scene
        raise
    return node


def volume_node_to_file(node, path: str | os.PathLike) -> Path:
    """Write a volume node to a file (format from the suffix) with its exact geometry."""
    return save_volume(volume_node_to_tensor(node), path, label=node.IsA(LABELMAP_CLASS))


def file_to_volume_node(path: str | os.PathLike, name: str, *, scene=None, label: bool = False, reference_node=None):
    """Load a volume file into a new node (placed next to ``reference_node`` when given)."""
    volume = load_volume(path, label=label)
    return tensor_to_volume_node(volume, name, scene=scene, label=label, reference_node=reference_node)


def snap_to_grid_of(volume: MetaTensor, reference_node) -> MetaTensor:
    """``volume`` carrying ``reference_node``'s exact IJK-to-RAS when it lies on that node's grid.

    Job outputs travel through files; NIfTI stores the matrix in float32 (≈ 6e-8 relative error), so an
    output the worker wrote on its input's grid comes back a few nanometres off. An output with the
    reference's voxel counts whose matrix agrees to 1e-6 of the matrix's largest entry (far below any
    real grid difference: 0.5 µm at 500 mm) gets the reference's float64 matrix; any other volume is
    returned unchanged.

    Args:
        volume: MetaTensor ``(1, I, J, K)`` with its affine (4x4 IJK-to-RAS, mm).
        reference_node: a volume node, or None.
    """
    if reference_node is None or reference_node.GetImageData() is None:
        return volume
    reference_matrix = ijk_to_ras_of(reference_node)
    same_size = tuple(volume.shape[-3:]) == tuple(reference_node.GetImageData().GetDimensions())
    tolerance = 1e-6 * max(1.0, float(np.abs(reference_matrix).max()))
    if same_size and np.abs(np.asarray(volume.affine, dtype=np.float64) - reference_matrix).max() <= tolerance:
        volume = volume.clone()
        volume.affine = torch.from_numpy(reference_matrix)
    return volume
