"""medgen.slicer against real MRML nodes (slicer-core): exact geometry, names/colours/values, clean scene."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medgen.errors import BadInputError
from medgen.io import load_volume
from medgen.labels import LabelInfo
from medgen.slicer.segmentations import labelmap_to_segmentation, segment_labels, segment_overlaps, segmentation_to_labelmap
from medgen.slicer.volumes import (
    file_to_volume_node,
    ijk_to_ras_of,
    tensor_to_volume_node,
    volume_node_to_file,
    volume_node_to_tensor,
)

slicer = pytest.importorskip("slicer")

LABELS = [LabelInfo("tumor", 2, (1.0, 0.0, 0.0)), LabelInfo("edema", 5, (0.0, 0.0, 1.0))]


def _labelmap(oblique, shape=(20, 16, 12)) -> MetaTensor:
    labels = torch.zeros(1, *shape, dtype=torch.int64)
    labels[0, 2:8, 3:9, 2:5] = 2
    labels[0, 10:15, 5:12, 6:10] = 5
    return MetaTensor(labels, affine=torch.from_numpy(oblique))


def _node_names(scene) -> list[str]:
    return sorted(scene.GetNthNode(i).GetName() for i in range(scene.GetNumberOfNodes()))


def test_volume_node_round_trip_is_exact_with_oblique_geometry(mrml_scene, oblique):
    volume = MetaTensor(torch.rand(1, 20, 16, 12), affine=torch.from_numpy(oblique))
    node = tensor_to_volume_node(volume, "input", scene=mrml_scene)
    np.testing.assert_allclose(ijk_to_ras_of(node), oblique, atol=1e-12)
    assert slicer.util.arrayFromVolume(node).shape == (12, 16, 20)  # Slicer arrays are KJI
    back = volume_node_to_tensor(node)
    assert torch.equal(back.as_tensor(), volume.as_tensor())
    np.testing.assert_allclose(np.asarray(back.affine), oblique, atol=1e-12)


def test_voxel_ijk_maps_to_the_same_ras_point_in_slicer_and_medgen(mrml_scene, oblique):
    volume = MetaTensor(torch.zeros(1, 20, 16, 12), affine=torch.from_numpy(oblique))
    volume[0, 3, 7, 5] = 1.0
    node = tensor_to_volume_node(volume, "probe", scene=mrml_scene)
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ras_slicer = matrix.MultiplyPoint((3, 7, 5, 1))[:3]
    ras_medgen = (np.asarray(volume.affine) @ np.array([3, 7, 5, 1]))[:3]
    np.testing.assert_allclose(ras_slicer, ras_medgen, atol=1e-9)
    assert slicer.util.arrayFromVolume(node)[5, 7, 3] == 1.0


def test_volume_node_file_round_trip_through_real_readers(mrml_scene, oblique, tmp_path):
    volume = MetaTensor(torch.rand(1, 20, 16, 12), affine=torch.from_numpy(oblique))
    node = tensor_to_volume_node(volume, "input", scene=mrml_scene)
    for suffix in (".nrrd", ".nii.gz"):
        path = volume_node_to_file(node, tmp_path / f"vol{suffix}")
        reloaded = file_to_volume_node(path, f"reloaded{suffix}", scene=mrml_scene)
        np.testing.assert_allclose(ijk_to_ras_of(reloaded), oblique, atol=1e-5)
        assert np.array_equal(slicer.util.arrayFromVolume(reloaded), slicer.util.arrayFromVolume(node))
    # Slicer's own storage node reads our NRRD with the same geometry
    storage = mrml_scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / "vol.nrrd"))
    by_slicer = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "read_by_slicer")
    assert storage.ReadData(by_slicer)
    np.testing.assert_allclose(ijk_to_ras_of(by_slicer), oblique, atol=1e-9)


def test_file_written_by_slicer_storage_node_loads_with_same_geometry(mrml_scene, oblique, tmp_path):
    node = tensor_to_volume_node(MetaTensor(torch.rand(1, 9, 8, 7), affine=torch.from_numpy(oblique)), "v", scene=mrml_scene)
    storage = mrml_scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / "by_slicer.nii.gz"))
    assert storage.WriteData(node)
    loaded = load_volume(tmp_path / "by_slicer.nii.gz")
    np.testing.assert_allclose(np.asarray(loaded.affine), oblique, atol=1e-5)
    assert np.array_equal(loaded[0].numpy().transpose(2, 1, 0), slicer.util.arrayFromVolume(node))


def test_label_volume_node_is_integer_labelmap(mrml_scene, oblique):
    node = tensor_to_volume_node(_labelmap(oblique), "labels", scene=mrml_scene, label=True)
    assert node.IsA("vtkMRMLLabelMapVolumeNode")
    back = volume_node_to_tensor(node)
    assert back.dtype == torch.int64 and torch.equal(back.as_tensor(), _labelmap(oblique).as_tensor())


@pytest.mark.parametrize("value", [2.0**31, -(2.0**31) - 1, 1.5, float("nan")])
def test_a_label_value_a_slicer_labelmap_cannot_hold_is_refused_not_wrapped(mrml_scene, value):
    """int32 is the widest label type; a cast would turn 2**31 into -2**31 and 1.5 into 1 without a word."""
    labels = torch.zeros(1, 4, 4, 4, dtype=torch.float64)
    labels[0, 1, 2, 3] = value
    names_before = _node_names(mrml_scene)
    with pytest.raises(BadInputError, match="not whole numbers in the int32 range"):
        tensor_to_volume_node(labels, "labels", scene=mrml_scene, label=True, affine=np.eye(4))
    assert _node_names(mrml_scene) == names_before


def test_the_largest_int32_label_reaches_the_scene_as_is(mrml_scene):
    labels = torch.zeros(1, 4, 4, 4, dtype=torch.int64)
    labels[0, 1, 2, 3] = 2**31 - 1
    node = tensor_to_volume_node(labels, "wide", scene=mrml_scene, label=True, affine=np.eye(4))
    assert torch.equal(volume_node_to_tensor(node).as_tensor(), labels)


def test_labelmap_to_segmentation_keeps_names_colors_values(mrml_scene, oblique):
    reference = tensor_to_volume_node(MetaTensor(torch.rand(1, 20, 16, 12), affine=torch.from_numpy(oblique)), "ref", scene=mrml_scene)
    names_before = _node_names(mrml_scene)
    absent = LabelInfo("necrosis", 7, (0.0, 1.0, 0.0))
    segmentation = labelmap_to_segmentation(_labelmap(oblique), LABELS + [absent], "result", scene=mrml_scene, reference_node=reference)
    assert segment_labels(segmentation) == LABELS + [absent]  # the absent label still gets an (empty) segment
    assert _node_names(mrml_scene) == sorted(names_before + ["result", "SegmentationDisplay"])  # no helper nodes left
    referenced = segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole())
    assert referenced.GetID() == reference.GetID()


def test_segment_terminology_survives_a_trip_through_label_files(mrml_scene, oblique, tmp_path):
    """A segment's chosen terminology (DICOM codes) goes into labels.json and comes back on the created segments;
    the generic 'Tissue' Slicer gives every new segment is not reported as a choice."""
    from medgen.labels import load_labels, save_labels

    liver = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
             "~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^")
    labels = [LabelInfo("tumor", 2, (1.0, 0.0, 0.0), liver), LabelInfo("edema", 5, (0.0, 0.0, 1.0))]
    first = labelmap_to_segmentation(_labelmap(oblique), labels, "drawn", scene=mrml_scene)
    read = segment_labels(first)
    assert read == labels and read[1].terminology == ""
    back = labelmap_to_segmentation(_labelmap(oblique), load_labels(save_labels(read, tmp_path / "labels.json")), "generated",
                                     scene=mrml_scene)
    assert segment_labels(back) == labels


def test_a_second_run_gets_unique_node_names(mrml_scene, oblique):
    """Running a job twice must not leave two nodes of one name (getNode by name would be ambiguous)."""
    volume = MetaTensor(torch.rand(1, 20, 16, 12), affine=torch.from_numpy(oblique))
    volumes = [tensor_to_volume_node(volume, "case7 (T2→T1)", scene=mrml_scene) for _ in range(2)]
    segmentations = [labelmap_to_segmentation(_labelmap(oblique), LABELS, "seg", scene=mrml_scene) for _ in range(2)]
    assert volumes[0].GetName() == "case7 (T2→T1)" and segmentations[0].GetName() == "seg"
    names = _node_names(mrml_scene)
    assert len({node.GetName() for node in volumes + segmentations}) == 4
    assert names.count("case7 (T2→T1)") == 1 and names.count("seg") == 1


def test_segmentation_round_trip_gives_original_label_values_on_reference_grid(mrml_scene, oblique):
    reference = tensor_to_volume_node(MetaTensor(torch.rand(1, 20, 16, 12), affine=torch.from_numpy(oblique)), "ref", scene=mrml_scene)
    segmentation = labelmap_to_segmentation(_labelmap(oblique), LABELS, "seg", scene=mrml_scene, reference_node=reference)
    nodes_before = _node_names(mrml_scene)
    labelmap, labels = segmentation_to_labelmap(segmentation, reference)
    # Slicer's export renumbers 1..N and crops to the segments without a reference; both are undone
    assert labelmap.shape == (1, 20, 16, 12)
    assert torch.equal(labelmap.as_tensor(), _labelmap(oblique).as_tensor())
    np.testing.assert_allclose(np.asarray(labelmap.affine), oblique, atol=1e-9)
    assert [label.name for label in labels] == ["tumor", "edema"]
    assert _node_names(mrml_scene) == nodes_before


def test_segmentation_from_segment_editor_style_values(mrml_scene, oblique):
    """Segments made in Slicer without explicit label values export as 1..N in segment order."""
    reference = tensor_to_volume_node(MetaTensor(torch.rand(1, 20, 16, 12), affine=torch.from_numpy(oblique)), "ref", scene=mrml_scene)
    segmentation = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    for name in ("liver", "spleen"):
        segmentation.GetSegmentation().AddEmptySegment(name, name)
    mask = np.zeros((12, 16, 20), np.uint8)
    mask[2:5, 3:9, 4:10] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, "spleen", reference)
    labelmap, labels = segmentation_to_labelmap(segmentation, reference)
    assert [(label.name, label.value) for label in labels] == [("liver", 1), ("spleen", 2)]
    assert int(labelmap.sum()) == 2 * int(mask.sum())


def test_overlapping_segments_keep_the_later_one_and_are_named_in_a_warning(mrml_scene, oblique, caplog):
    import vtk

    from medgen.slicer.segmentations import _export_segments

    reference = tensor_to_volume_node(MetaTensor(torch.rand(1, 16, 16, 16), affine=torch.from_numpy(oblique)), "ref", scene=mrml_scene)
    segmentation = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nested")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    organ, tumour, vessel = (np.zeros((16, 16, 16), np.uint8) for _ in range(3))
    organ[2:8, 2:8, 2:8] = 1
    tumour[5:10, 5:10, 5:10] = 1  # 3x3x3 voxels inside the organ
    vessel[6, 6, 0:16] = 1  # a row through the tumour (voxels 5..9) and the organ (2..7; 2..4 outside the tumour)
    for name, mask in (("organ", organ), ("tumour", tumour), ("vessel", vessel)):
        segmentation.GetSegmentation().AddEmptySegment(name, name)
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, name, reference)
    assert segmentation.GetSegmentation().GetNumberOfLayers() == 3
    nodes_before = _node_names(mrml_scene)
    with caplog.at_level("WARNING", logger="medgen.slicer.segmentations"):
        labelmap, _ = segmentation_to_labelmap(segmentation, reference)
    assert segment_overlaps(segmentation, reference) == [("organ", "tumour", 27), ("organ", "vessel", 3), ("tumour", "vessel", 5)]
    assert "'organ' and 'tumour' share 27 voxels" in caplog.text and "keeps the later segment" in caplog.text
    assert int((labelmap == 3).sum()) == 16 and int((labelmap == 2).sum()) == int(tumour.sum()) - 5
    # laying segments over each other gives what Slicer's own export of all segments gives
    every_segment = vtk.vtkStringArray()
    segmentation.GetSegmentation().GetSegmentIDs(every_segment)
    assert torch.equal(labelmap.as_tensor(), _export_segments(segmentation, every_segment, reference).as_tensor())
    assert _node_names(mrml_scene) == nodes_before


def test_segments_in_one_layer_cannot_overlap_and_raise_no_warning(mrml_scene, oblique, caplog):
    reference = tensor_to_volume_node(MetaTensor(torch.rand(1, 20, 16, 12), affine=torch.from_numpy(oblique)), "ref", scene=mrml_scene)
    segmentation = labelmap_to_segmentation(_labelmap(oblique), LABELS, "seg", scene=mrml_scene, reference_node=reference)
    with caplog.at_level("WARNING", logger="medgen.slicer.segmentations"):
        segmentation_to_labelmap(segmentation, reference)
    assert segment_overlaps(segmentation, reference) == [] and "overlap" not in caplog.text


def test_empty_segmentation_is_refused(mrml_scene, oblique):
    reference = tensor_to_volume_node(MetaTensor(torch.rand(1, 8, 8, 8), affine=torch.from_numpy(oblique)), "ref", scene=mrml_scene)
    empty = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    with pytest.raises(BadInputError, match="no segments"):
        segmentation_to_labelmap(empty, reference)


def test_results_are_placed_next_to_the_input(mrml_scene, oblique):
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml_scene)
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "patient"), "study")
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    source = tensor_to_volume_node(MetaTensor(torch.rand(1, 8, 8, 8), affine=torch.from_numpy(oblique)), "T1", scene=mrml_scene)
    source_item = hierarchy.GetItemByDataNode(source) or hierarchy.CreateItem(study, source)
    hierarchy.SetItemParent(source_item, study)
    source.SetAndObserveTransformNodeID(transform.GetID())
    output = tensor_to_volume_node(MetaTensor(torch.rand(1, 8, 8, 8), affine=torch.from_numpy(oblique)), "T1 out", scene=mrml_scene, reference_node=source)
    segmentation = labelmap_to_segmentation(_labelmap(oblique, (8, 8, 8)), LABELS, "seg", scene=mrml_scene, reference_node=source)
    for node in (output, segmentation):
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study
        assert node.GetTransformNodeID() == transform.GetID()


def test_vector_volume_is_refused(mrml_scene):
    node = mrml_scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    slicer.util.updateVolumeFromArray(node, np.zeros((4, 5, 6, 3), np.uint8))
    with pytest.raises(BadInputError, match="3 components"):
        volume_node_to_tensor(node)


def test_scene_is_unchanged_when_import_fails(mrml_scene):
    names_before = _node_names(mrml_scene)
    with pytest.raises(BadInputError):
        tensor_to_volume_node(torch.zeros(2, 4, 4, 4), "bad", scene=mrml_scene, affine=np.eye(4))
    assert _node_names(mrml_scene) == names_before


def test_a_segmentation_import_that_slicer_refuses_leaves_the_scene_as_it_was(mrml_scene, oblique, monkeypatch):
    """When Slicer refuses the label map, the half-built segmentation node goes with its temporary label map and
    colour table: the scene holds exactly the nodes it held before."""
    from medgen.slicer import segmentations

    class RefusingLogic:
        def ImportLabelmapToSegmentationNode(self, labelmap_node, segmentation_node):
            return False

    monkeypatch.setattr(segmentations, "segmentations_logic", lambda scene: RefusingLogic())
    names_before = _node_names(mrml_scene)
    with pytest.raises(BadInputError, match="could not import the label map"):
        labelmap_to_segmentation(_labelmap(oblique), [LabelInfo("liver", 1, (1.0, 0.0, 0.0))], "refused", scene=mrml_scene)
    assert _node_names(mrml_scene) == names_before
