"""A job fed from real MRML nodes: results come back next to the input; a cancelled job leaves the scene intact."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medgen.errors import BadInputError
from medgen.jobs.exit_codes import ExitCode
from medgen.io import load_volume
from medgen.labels import LabelInfo, load_labels
from medgen.slicer.scene_job import JobRequest, OutputImport, SceneJob, import_outputs, write_node_inputs
from medgen.slicer.segmentations import labelmap_to_segmentation, segment_labels
from medgen.slicer.volumes import ijk_to_ras_of, tensor_to_volume_node
from medgen_testing import cancel_once_running, scene_snapshot

slicer = pytest.importorskip("slicer")


@pytest.fixture
def input_node(mrml_scene, oblique):
    return tensor_to_volume_node(MetaTensor(torch.rand(1, 16, 16, 16), affine=torch.from_numpy(oblique)), "T1", scene=mrml_scene)


def test_selftest_on_a_scene_volume_imports_result_with_input_geometry(mrml_scene, input_node, tmp_path, oblique):
    request = JobRequest("selftest", {"image": input_node}, {"steps": 2}, imports=(OutputImport("image", "T1 smoothed"),))
    job = SceneJob(request, tmp_path, device="cpu").start()
    assert job.wait(timeout_s=120) == ExitCode.OK
    nodes = job.import_results(scene=mrml_scene)
    output = nodes["image"]
    assert output.GetName() == "T1 smoothed"
    np.testing.assert_array_equal(ijk_to_ras_of(output), ijk_to_ras_of(input_node))  # not the NIfTI's float32 copy
    assert slicer.util.arrayFromVolume(output).std() < slicer.util.arrayFromVolume(input_node).std()
    # the scene closed before the results came back (another patient's scene may be open now): nothing is imported
    mrml_scene.Clear(0)
    before = scene_snapshot(mrml_scene)
    with pytest.raises(BadInputError, match=rf"inputs \('T1'\) left the scene .* kept in {job.job_dir / 'outputs'}"):
        job.import_results(scene=mrml_scene)
    assert scene_snapshot(mrml_scene) == before


def test_outputs_on_the_reference_grid_get_its_exact_matrix_and_others_keep_their_own(mrml_scene, input_node, tmp_path, oblique):
    from medgen.io import save_volume

    reference = ijk_to_ras_of(input_node)
    shifted = oblique.copy()
    shifted[:3, 3] += 0.01  # 10 µm: a different grid, not file rounding
    outputs = {
        "same grid": save_volume(MetaTensor(torch.rand(1, 16, 16, 16), affine=torch.from_numpy(oblique)), tmp_path / "same.nii.gz"),
        "shifted": save_volume(MetaTensor(torch.rand(1, 16, 16, 16), affine=torch.from_numpy(shifted)), tmp_path / "shifted.nii.gz"),
        "cropped": save_volume(MetaTensor(torch.rand(1, 8, 16, 16), affine=torch.from_numpy(oblique)), tmp_path / "cropped.nii.gz"),
    }
    assert not np.array_equal(load_volume(outputs["same grid"]).affine.numpy(), reference)  # NIfTI keeps float32 only
    imports = [OutputImport(name, name) for name in outputs]
    nodes = import_outputs({name: str(path) for name, path in outputs.items()}, imports, reference_node=input_node, scene=mrml_scene)
    np.testing.assert_array_equal(ijk_to_ras_of(nodes["same grid"]), reference)
    np.testing.assert_allclose(ijk_to_ras_of(nodes["shifted"]), shifted, atol=1e-5)
    assert np.abs(ijk_to_ras_of(nodes["shifted"]) - reference).max() > 5e-3
    assert not np.array_equal(ijk_to_ras_of(nodes["cropped"]), reference)
    np.testing.assert_allclose(ijk_to_ras_of(nodes["cropped"]), oblique, atol=1e-5)


def test_an_output_that_cannot_be_imported_takes_the_others_back_out(mrml_scene, input_node, tmp_path, oblique):
    """Imports are all or nothing: the volume imported before a damaged output goes again, with its display nodes and
    subject-hierarchy item, and the scene holds what it held before."""
    from medgen.errors import MedGenError
    from medgen.io import save_volume

    good = save_volume(MetaTensor(torch.rand(1, 16, 16, 16), affine=torch.from_numpy(oblique)), tmp_path / "good.nii.gz")
    damaged = tmp_path / "damaged.nii.gz"
    damaged.write_bytes(good.read_bytes()[:200])
    nodes_before = mrml_scene.GetNumberOfNodes()
    with pytest.raises(MedGenError):
        import_outputs({"good": str(good), "damaged": str(damaged)}, [OutputImport("good", "good"), OutputImport("damaged", "damaged")],
                       reference_node=input_node, scene=mrml_scene)
    assert mrml_scene.GetNumberOfNodes() == nodes_before
    assert not mrml_scene.GetFirstNodeByName("good")


def test_a_refused_job_says_which_parameter_and_leaves_no_copies_of_the_inputs(mrml_scene, input_node, tmp_path):
    from medgen.errors import BadInputError

    request = JobRequest("selftest", {"image": input_node}, {"steps": 0})
    with pytest.raises(BadInputError, match=r"^Parameter 'steps' of the selftest job: 0 is less than the minimum of 1"):
        SceneJob(request, tmp_path, device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_cancelled_job_leaves_the_scene_intact(mrml_scene, input_node, tmp_path):
    before = scene_snapshot(mrml_scene)
    voxels_before = slicer.util.arrayFromVolume(input_node).copy()
    request = JobRequest("selftest", {"image": input_node}, {"steps": 500, "step_delay_s": 0.05}, imports=(OutputImport("image", "never"),))
    job = SceneJob(request, tmp_path, device="cpu").start()
    cancel_once_running(job)
    assert job.wait(timeout_s=60) == ExitCode.CANCELLED
    assert job.import_results(scene=mrml_scene) == {}
    assert scene_snapshot(mrml_scene) == before
    assert np.array_equal(slicer.util.arrayFromVolume(input_node), voxels_before)


def test_results_of_a_reference_gone_from_the_scene_go_to_the_root_not_under_a_reused_transform(mrml_scene, input_node, tmp_path):
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "head position")
    input_node.SetAndObserveTransformNodeID(transform.GetID())
    paths = write_node_inputs({"image": input_node}, tmp_path, reference_node=input_node)
    mrml_scene.Clear(0)  # the scene closed while the job ran; node IDs start again
    unrelated = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "unrelated")
    assert unrelated.GetID() == transform.GetID()
    imported = import_outputs(paths, [OutputImport("image", "result")], reference_node=input_node, scene=mrml_scene)
    assert imported["image"].GetScene() is mrml_scene and imported["image"].GetTransformNodeID() is None


def test_requests_without_a_volume_or_on_an_empty_reference_are_clear_errors(mrml_scene, input_node, oblique):
    from medgen.errors import BadInputError
    from medgen.slicer.scene_job import selftest_request
    from medgen.slicer.segmentations import segmentation_to_labelmap

    with pytest.raises(BadInputError, match="Select the volume the self-test runs on"):
        selftest_request(None, "MedGen")
    labels = torch.zeros(1, 16, 16, 16, dtype=torch.int64)
    labels[0, 2:6, 2:6, 2:6] = 1
    segmentation = labelmap_to_segmentation(MetaTensor(labels, affine=torch.from_numpy(oblique)), [LabelInfo("lesion", 1, (1.0, 0.5, 0.0))],
                                            "seg", scene=mrml_scene, reference_node=input_node)
    empty = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "not loaded")
    with pytest.raises(BadInputError, match="reference volume 'not loaded' has no image data, so segmentation 'seg'"):
        segmentation_to_labelmap(segmentation, empty)
    elsewhere = tensor_to_volume_node(MetaTensor(torch.rand(1, 8, 8, 8), affine=torch.tensor(
        [[1.0, 0, 0, 500.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float64)), "far away", scene=mrml_scene)
    assert not segmentation_to_labelmap(segmentation, elsewhere)[0].any()  # masks may be empty: generation skips them
    with pytest.raises(BadInputError, match="Segmentation 'seg' has no voxel on the grid of 'far away'"):
        segmentation_to_labelmap(segmentation, elsewhere, require_voxels=True)


def test_segmentation_inputs_are_written_with_their_label_values_and_names(mrml_scene, input_node, tmp_path, oblique):
    labels = torch.zeros(1, 16, 16, 16, dtype=torch.int64)
    labels[0, 2:6, 2:6, 2:6] = 3
    segmentation = labelmap_to_segmentation(
        MetaTensor(labels, affine=torch.from_numpy(oblique)), [LabelInfo("lesion", 3, (1.0, 0.5, 0.0))], "seg",
        scene=mrml_scene, reference_node=input_node,
    )
    paths = write_node_inputs({"image": input_node, "label": segmentation}, tmp_path, reference_node=input_node)
    assert load_labels(tmp_path / "label_labels.json") == [LabelInfo("lesion", 3, (1.0, 0.5, 0.0))]
    imported = import_outputs(paths, [OutputImport("label", "seg again", "segmentation")], reference_node=input_node, scene=mrml_scene)
    assert segment_labels(imported["label"]) == [LabelInfo("lesion", 3, (1.0, 0.5, 0.0))]


def _result_folder(folder):
    (folder / "weights").mkdir(parents=True)
    (folder / "weights" / "model.safetensors").write_bytes(b"w" * 100)
    (folder / "model.json").write_text("{}")
    return folder


def test_a_result_moved_to_another_disk_arrives_whole_or_not_at_all(tmp_path, monkeypatch):
    import errno
    import shutil

    from medgen.slicer import scene_job

    real_replace = os.replace

    def across_disks(source, destination):  # a folder rename fails across file systems; a staged one is local
        if not Path(destination).name.startswith(".") and not Path(source).name.startswith("."):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(source, destination)

    monkeypatch.setattr(scene_job.os, "replace", across_disks)
    moved = scene_job.move_into(_result_folder(tmp_path / "job" / "model"), tmp_path / "mine" / "model")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["model"] and not (tmp_path / "job" / "model").exists()
    assert (moved / "weights" / "model.safetensors").read_bytes() == b"w" * 100

    def disk_full(source, destination, **kwargs):
        Path(destination).mkdir()
        (Path(destination) / "model.json").write_text("{")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copytree", disk_full)
    source = _result_folder(tmp_path / "job2" / "model")
    with pytest.raises(BadInputError, match=f"Could not copy the result to .*No space left.*it is still in {source}"):
        scene_job.move_into(source, tmp_path / "mine" / "second")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["model"]  # nothing half-copied blocks a retry
    assert (source / "weights" / "model.safetensors").is_file()


def test_a_destination_filled_while_the_job_ran_keeps_the_result_and_says_where(tmp_path):
    from medgen.slicer import scene_job

    source = _result_folder(tmp_path / "job" / "model")
    taken = tmp_path / "mine" / "model"
    taken.mkdir(parents=True)
    (taken / "notes.txt").write_text("the user's")
    with pytest.raises(BadInputError, match=f"already exists and is not empty.*The result was kept in {source}"):
        scene_job.move_into(source, taken)
    assert (source / "weights" / "model.safetensors").is_file() and (taken / "notes.txt").read_text() == "the user's"


def test_results_come_back_while_any_scene_input_remains_and_without_scene_inputs(mrml_scene, input_node, oblique, tmp_path):
    from medgen.slicer.scene_job import check_scene_inputs_remain

    other = tensor_to_volume_node(MetaTensor(torch.rand(1, 16, 16, 16), affine=torch.from_numpy(oblique)), "T2", scene=mrml_scene)
    result = {"outputs": {"image": str(tmp_path / "outputs" / "image.nii.gz")}}
    two_inputs = JobRequest("selftest", {"image": input_node, "other": other})
    mrml_scene.RemoveNode(other)
    check_scene_inputs_remain(two_inputs, result, mrml_scene)  # one input deleted: the results still belong here
    check_scene_inputs_remain(JobRequest("synthesize"), result, mrml_scene)  # from a model folder: any scene takes them
    mrml_scene.RemoveNode(input_node)
    with pytest.raises(BadInputError, match="inputs \\('T1', 'T2'\\) left the scene"):
        check_scene_inputs_remain(two_inputs, result, mrml_scene)


def test_a_destination_filled_after_its_check_keeps_both_results_and_says_where(tmp_path, monkeypatch):
    """Two panels moving results into one empty folder at the same moment: the second met a raw OSError."""
    from medgen.slicer import scene_job

    source = _result_folder(tmp_path / "job" / "model")
    destination = tmp_path / "mine" / "model"
    destination.mkdir(parents=True)
    real_check = scene_job.check_free_destination

    def the_other_panel_moves_in_after_the_check(folder):
        real_check(folder)
        (folder / "model.json").write_text("the other panel's")

    monkeypatch.setattr(scene_job, "check_free_destination", the_other_panel_moves_in_after_the_check)
    with pytest.raises(BadInputError, match=f"Could not move the result to .*; it is in {source}"):
        scene_job.move_into(source, destination)
    assert (destination / "model.json").read_text() == "the other panel's"
    assert (source / "weights" / "model.safetensors").is_file()
