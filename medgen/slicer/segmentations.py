"""Segmentation nodes <-> integer label maps, keeping segment names, colours and label values.

Two Slicer traps are handled here: exporting segments to a labelmap renumbers them 1..N in segment
order (so values are mapped back through each segment's own label value), and an export without a
reference geometry is cropped to the segments' extent (so a reference volume is always used).
Overlapping segments cannot survive in one label map; the export keeps the later one and says so.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch
from monai.data import MetaTensor

from medgen.errors import BadInputError
from medgen.labels import LabelInfo, default_color, name_key
from medgen.slicer.scene import place_next_to, remove_nodes, resolve_scene, segmentations_logic
from medgen.slicer.volumes import tensor_to_volume_node, volume_node_to_tensor


def check_segmentation_node(node) -> None:
    """Refuse a node that is not a segmentation (a label map volume is the usual mix-up), saying what to do."""
    if node is not None and not node.IsA("vtkMRMLSegmentationNode"):
        kind = "a label map volume" if node.IsA("vtkMRMLLabelMapVolumeNode") else f"a {node.GetClassName()}"
        raise BadInputError(
            f"'{node.GetName()}' is {kind}, not a segmentation. Convert it first (Data module: right-click it, "
            "'Convert labelmap to segmentation node') or select a segmentation node."
        )


def segment_labels(segmentation_node) -> list[LabelInfo]:
    """Name, label value and colour of each segment, in segment order.

    A segment without its own label value (0) gets its 1-based position, as Slicer's export would.
    """
    check_segmentation_node(segmentation_node)
    segmentation = segmentation_node.GetSegmentation()
    labels = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        value = int(segment.GetLabelValue()) or index + 1
        labels.append(LabelInfo(segment.GetName(), value, tuple(float(c) for c in segment.GetColor()), _chosen_terminology(segment)))
    if len({label.value for label in labels}) != len(labels):  # shared or missing values: fall back to order
        labels = [dataclasses.replace(label, value=index + 1) for index, label in enumerate(labels)]
    return labels


def segment_name_key(name: str) -> str:
    """How segment names are matched across segmentations and against model classes (:func:`medgen.labels.name_key`)."""
    return name_key(name)


def segmentation_to_labelmap(segmentation_node, reference_volume_node, *, require_voxels: bool = False) -> tuple[MetaTensor, list[LabelInfo]]:
    """Export all segments onto the reference volume's grid as one label map.

    Where segments overlap the later one keeps the voxel, as in Slicer's own export, and a warning names the
    pairs (:func:`segment_overlaps`).

    Args:
        require_voxels: refuse a segmentation with no voxel on the reference grid (training data); generation
            masks leave it off, since an empty mask is skipped and reported there.

    Returns:
        ``(labelmap, labels)``: int64 MetaTensor ``(1, I, J, K)`` on the reference grid whose voxel
        values are the segments' label values, and the :class:`LabelInfo` of every segment.

    Raises:
        BadInputError: no segments, no reference volume (or one without voxels), or, with ``require_voxels``,
            segments that are empty or lie outside the reference volume.
    """
    check_segmentation_node(segmentation_node)
    if segmentation_node is None or segmentation_node.GetSegmentation().GetNumberOfSegments() == 0:
        raise BadInputError("The segmentation has no segments. Draw or load at least one segment first.")
    if reference_volume_node is None:
        raise BadInputError("A reference volume is needed to export a segmentation on its voxel grid.")
    if reference_volume_node.GetImageData() is None:
        # Slicer would export on the segments' own extent instead: the cropped, shifted grid this function avoids
        raise BadInputError(f"The reference volume '{reference_volume_node.GetName()}' has no image data, so "
                            f"segmentation '{segmentation_node.GetName()}' cannot be exported on its grid; load it first.")
    labels = segment_labels(segmentation_node)
    renumbered, overlaps = _segment_order_labelmap(segmentation_node, reference_volume_node)
    if overlaps:
        pairs = "; ".join(f"'{earlier}' and '{later}' share {voxels} voxels" for earlier, later, voxels in overlaps)
        logging.getLogger(__name__).warning(
            f"Segments of '{segmentation_node.GetName()}' overlap on the grid of '{reference_volume_node.GetName()}': "
            f"{pairs}. A label map keeps the later segment there (segment order); remove the overlap in Segment "
            "Editor if that is not what you drew."
        )
    lookup = torch.zeros(len(labels) + 1, dtype=torch.int64)
    for position, label in enumerate(labels, start=1):
        lookup[position] = label.value
    labelmap = MetaTensor(lookup[renumbered.as_tensor()], affine=renumbered.affine)
    if require_voxels and not bool(labelmap.as_tensor().any()):
        raise BadInputError(f"Segmentation '{segmentation_node.GetName()}' has no voxel on the grid of "
                            f"'{reference_volume_node.GetName()}': its segments are empty or lie outside that volume.")
    return labelmap, labels


def _export_segments(segmentation_node, segment_ids, reference_volume_node) -> MetaTensor:
    """Slicer's export of ``segment_ids`` (a vtkStringArray) onto the reference grid: ``(1, I, J, K)`` int64,
    values 1..n in the order of ``segment_ids``, where overlapping segments the later one wins."""
    scene = segmentation_node.GetScene()
    color_tables_before = _color_table_ids(scene)
    labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "medgen_export")
    try:
        exported = segmentations_logic(scene).ExportSegmentsToLabelmapNode(
            segmentation_node, segment_ids, labelmap_node, reference_volume_node
        )
        if not exported:
            raise BadInputError(f"Slicer could not export segmentation '{segmentation_node.GetName()}' to a label map.")
        return volume_node_to_tensor(labelmap_node)
    finally:
        # the export also adds a '<segmentation>_ColorTable' node; leave the scene as we found it
        new_tables = [scene.GetNodeByID(node_id) for node_id in _color_table_ids(scene) - color_tables_before]
        remove_nodes(scene, labelmap_node, *new_tables)


def segment_overlaps(segmentation_node, reference_volume_node) -> list[tuple[str, str, int]]:
    """Segments that take voxels from an earlier segment on the reference grid: ``(earlier name, later name, voxels)``.

    A label map holds one value per voxel, so where segments overlap the later segment keeps the voxel
    (right for a tumour drawn inside its organ, a silent loss otherwise).
    """
    return _segment_order_labelmap(segmentation_node, reference_volume_node)[1]


def _segment_order_labelmap(segmentation_node, reference_volume_node) -> tuple[MetaTensor, list[tuple[str, str, int]]]:
    """All segments on the reference grid, values 1..N in segment order (the later segment wins where they
    overlap, as in Slicer's export), and the overlaps (:func:`segment_overlaps`).

    Segments in one shared layer cannot overlap: one export. Otherwise each segment is exported on its own
    and laid over the earlier ones, so an overlap is seen where it happens, in one pass over the segments.
    """
    import vtk

    segmentation = segmentation_node.GetSegmentation()
    segment_ids = vtk.vtkStringArray()
    segmentation.GetSegmentIDs(segment_ids)
    if segmentation.GetNumberOfLayers() < 2:
        return _export_segments(segmentation_node, segment_ids, reference_volume_node), []
    names = [segmentation.GetNthSegment(index).GetName() for index in range(segment_ids.GetNumberOfValues())]
    labelmap, overlaps = None, []
    for index in range(segment_ids.GetNumberOfValues()):
        single = vtk.vtkStringArray()
        single.InsertNextValue(segment_ids.GetValue(index))
        exported = _export_segments(segmentation_node, single, reference_volume_node)
        if labelmap is None:
            labelmap = MetaTensor(torch.zeros_like(exported.as_tensor()), affine=exported.affine)
        inside = exported.as_tensor() > 0
        taken = labelmap.as_tensor()[inside]
        earlier_values, voxels = torch.unique(taken[taken > 0], return_counts=True)
        overlaps += [(names[int(value) - 1], names[index], int(count)) for value, count in zip(earlier_values, voxels)]
        labelmap.as_tensor()[inside] = index + 1
    return labelmap, overlaps


def _color_table_ids(scene) -> set[str]:
    nodes = scene.GetNodesByClass("vtkMRMLColorTableNode")
    return {nodes.GetItemAsObject(i).GetID() for i in range(nodes.GetNumberOfItems())}


def _color_table_for(scene, labels: list[LabelInfo]):
    color_table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "medgen_import_colors")
    color_table.SetTypeToUser()
    color_table.SetNumberOfColors(max(label.value for label in labels) + 1)
    color_table.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    for label in labels:
        color_table.SetColor(label.value, label.name, *label.color, 1.0)
    return color_table


def labelmap_to_segmentation(labelmap: torch.Tensor, labels: list[LabelInfo], name: str, *, scene=None, reference_node=None):
    """Add a segmentation node with one named, coloured segment per label.

    Args:
        labelmap: integer MetaTensor ``(1, I, J, K)`` (values = ``LabelInfo.value``, 0 = background).
        labels: the structures; values found in ``labelmap`` but not listed get ``Label <v>``; listed
            labels with no voxels still get an (empty) segment so every structure is present.
        name: segmentation node name.
        scene: target scene (default ``slicer.mrmlScene``).
        reference_node: volume whose geometry becomes the segmentation's reference geometry; the node
            is placed next to it in the subject hierarchy.
    """
    scene = resolve_scene(scene)
    values_present = {int(v) for v in torch.unique(torch.as_tensor(labelmap)).tolist()} - {0}
    known = {label.value for label in labels}
    labels = list(labels) + [LabelInfo(f"Label {v}", v, default_color(v)) for v in sorted(values_present - known)]
    if not labels:
        raise BadInputError("Nothing to import: the label map is empty and no labels were named.")
    labelmap_node = tensor_to_volume_node(labelmap, f"{name}_labelmap", scene=scene, label=True)
    color_table = _color_table_for(scene, labels)
    segmentation_node = None
    try:
        labelmap_node.GetDisplayNode().SetAndObserveColorNodeID(color_table.GetID())
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(name))
        segmentation_node.CreateDefaultDisplayNodes()
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node or labelmap_node)
        if not segmentations_logic(scene).ImportLabelmapToSegmentationNode(labelmap_node, segmentation_node):
            raise BadInputError(f"Slicer could not import the label map into segmentation '{name}'.")
        _name_color_and_complete(segmentation_node, labels)
        if reference_node is not None:
            segmentation_node.SetNodeReferenceID(segmentation_node.GetReferenceImageGeometryReferenceRole(), reference_node.GetID())
            place_next_to(segmentation_node, reference_node)
    except Exception:
        remove_nodes(scene, segmentation_node)
        raise
    finally:
        remove_nodes(scene, labelmap_node, color_table)
    return segmentation_node


def _name_color_and_complete(segmentation_node, labels: list[LabelInfo]) -> None:
    """Set name, colour and label value on every imported segment; add empty segments for absent labels."""
    segmentation = segmentation_node.GetSegmentation()
    by_name = {label.name: label for label in labels}
    present = set()
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        label = by_name.get(segment.GetName())
        if label is not None:
            _describe_segment(segment, label)
            present.add(label.name)
    for label in labels:
        if label.name not in present:
            segment_id = segmentation.AddEmptySegment(label.name, label.name, list(label.color))
            _describe_segment(segmentation.GetSegment(segment_id), label)


def _chosen_terminology(segment) -> str:
    """The segment's terminology entry when someone chose one; "" for the generic 'Tissue' every new segment gets."""
    terminology = segment.GetTerminology()
    return "" if terminology == _default_terminology() else terminology


@functools.cache
def _default_terminology() -> str:
    import slicer

    return slicer.vtkSegment().GetTerminology()


def _describe_segment(segment, label: LabelInfo) -> None:
    """Colour, label value and (when known) Slicer terminology of one segment."""
    segment.SetColor(*label.color)
    segment.SetLabelValue(label.value)
    if label.terminology:
        segment.SetTerminology(label.terminology)
