"""TenVOO Fine-Tune module on a real MRML scene: scene pairs -> adapter -> adapted segmentation and Dice table.

The worker runs for real on a tiny UNet pretrained on bright blobs, adapted to dark blobs; one adapter
is trained per file and shared.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import vtk
from monai.data import MetaTensor

from medgen_testing import TINY_UNET_KWARGS, blob_case, cancel_once_running, make_mrml_scene, oblique_affine, pretrained_blob_model, scene_snapshot, tiny_unet_spec
from medgen.errors import BadInputError, ModelError
from medgen.io import load_volume
from medgen.jobs.exit_codes import ExitCode
from medgen.labels import LabelInfo
from medgen.slicer.scene import subject_hierarchy
from medgen.slicer.scene_job import SceneJob, SceneJobLogicMixin
from medgen.slicer.segmentations import labelmap_to_segmentation, segment_labels
from medgen.slicer.volumes import ijk_to_ras_of, tensor_to_volume_node

slicer = pytest.importorskip("slicer")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "TenVOOSlicer"))
from TenVOOSlicerLib import adaptation  # noqa: E402  (the module folder is what Slicer puts on sys.path)

OPTIONS = {"rank": 2, "exclude_first_last_conv": False}
TRAINING = dict(steps=10, lr=1e-2, val_every=5)


def _blob_pair(scene, name: str, seed: int, segment_names=("tumour",)):
    """A dark-blob volume and its segmentation (value 3, so class values must be remapped to 1)."""
    image, label = blob_case(seed, oblique_affine())
    volume = tensor_to_volume_node(image, f"{name} MR", scene=scene)
    labels = [LabelInfo(segment, 3 + n, (1.0, 0.5, 0.0)) for n, segment in enumerate(segment_names)]
    segmentation = labelmap_to_segmentation(label * 3, labels, f"{name} segmentation", scene=scene, reference_node=volume)
    return adaptation.TrainingPair(volume, segmentation)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(pretrained_blob_model(tmp_path_factory.mktemp("scratch"), tmp_path_factory.mktemp("unet")))


@pytest.fixture(scope="module")
def trained(model, tmp_path_factory):
    """Two scene pairs plus a validation pair, adapted with TenVOO-L through the worker."""
    scenes = make_mrml_scene()
    scene = next(scenes)
    pairs = [_blob_pair(scene, f"case {n}", n) for n in range(2)]
    validation = _blob_pair(scene, "validation", 10, segment_names=("blob",))
    adapter_folder = tmp_path_factory.mktemp("adapters") / "blob adapter"
    request = adaptation.finetune_request(model, pairs, "tenvoo-l", OPTIONS, validation=validation,
                                          adapter_folder=adapter_folder, **TRAINING)
    readout = adaptation.TrainingReadout()
    job = SceneJob(request, tmp_path_factory.mktemp("jobs"), device="cpu", on_event=readout.record).start()
    assert job.wait(timeout_s=600) == ExitCode.OK, job.runner.error
    yield {"outputs": job.import_results(), "readout": readout, "inputs": job.job_dir, "adapter_folder": adapter_folder}
    next(scenes, None)


def test_preview_counts_what_the_method_trains(model):
    from medgen.models.segmentation import load_segmentation_model
    from medgen.peft import inject, trainable_parameters

    trainable, total = adaptation.preview_parameter_count(model, "tenvoo-l", OPTIONS)
    network = load_segmentation_model(model).network
    inject(network, "tenvoo-l", **OPTIONS)
    assert trainable == trainable_parameters(network) > 0
    assert total == sum(parameter.numel() for parameter in network.parameters()) > trainable
    assert adaptation.format_parameter_count(trainable, total).startswith(f"Trainable parameters: {trainable:,} of {total:,} (")


def test_training_pairs_are_written_with_the_model_class_values(trained):
    from medgen.io import load_volume

    inputs = next((trained["inputs"].parent).glob("inputs-*"))
    for stem in ("pair000", "pair001", "validation"):
        label = load_volume(inputs / f"{stem}_label.nrrd", label=True)
        assert torch.equal(torch.unique(label), torch.tensor([0, 1]))  # segment value 3 -> class 1
        np.testing.assert_allclose(label.affine.numpy(), oblique_affine(), atol=1e-5)


def test_finetune_saves_the_adapter_where_asked_and_reports_loss_and_validation_dice(trained):
    outputs = trained["outputs"]
    assert outputs["adapter"] == trained["adapter_folder"] and any(outputs["adapter"].iterdir())
    assert outputs["report"].is_file()
    readout = trained["readout"]
    assert readout.step == TRAINING["steps"] and readout.loss > 0 and 0 <= readout.val_dice <= 1
    assert readout.text().startswith("step 10: loss ") and "validation Dice" in readout.text()


def test_infer_imports_the_class_names_on_the_input_grid_next_to_it(trained, model, mrml_scene, tmp_path):
    held_out = _blob_pair(mrml_scene, "held-out", 20)
    hierarchy = subject_hierarchy(mrml_scene)
    study = hierarchy.CreateFolderItem(hierarchy.GetSceneItemID(), "study")
    hierarchy.CreateItem(study, held_out.volume)  # outside the app, new nodes get no subject-hierarchy item
    nodes = SceneJobLogicMixin().runJob(adaptation.infer_request(model, held_out.volume, trained["outputs"]["adapter"]),
                                        jobRoot=tmp_path, device="cpu")
    segmentation = nodes["segmentation"]
    assert segmentation.GetName() == "held-out MR adapted segmentation"
    assert [label.name for label in segment_labels(segmentation)] == ["blob"]
    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is held_out.volume
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(segmentation)) == study
    voxels = segmentation.GetSegmentation().GetNthSegment(0).GetRepresentation("Binary labelmap")
    image_to_world = vtk.vtkMatrix4x4()
    voxels.GetImageToWorldMatrix(image_to_world)
    matrix = np.array([[image_to_world.GetElement(row, column) for column in range(4)] for row in range(4)])
    np.testing.assert_allclose(matrix, ijk_to_ras_of(held_out.volume), atol=1e-12)  # the exact matrix, not the NIfTI float32 copy


def test_compare_returns_base_and_adapted_dice_per_class(trained, model, mrml_scene, tmp_path):
    held_out = _blob_pair(mrml_scene, "held-out", 21)
    before = scene_snapshot(mrml_scene)
    result = SceneJobLogicMixin().runJob(
        adaptation.compare_request(model, held_out.volume, held_out.segmentation, trained["outputs"]["adapter"]),
        jobRoot=tmp_path, device="cpu")
    (row,) = result["dice"]
    assert row["class"] == "blob" and 0 <= row["base_dice"] <= 1 and 0 <= row["adapted_dice"] <= 1
    assert adaptation.format_dice_rows(result["dice"]).startswith("blob: base ")
    assert scene_snapshot(mrml_scene) == before


def test_segments_that_are_not_model_classes_are_refused_before_any_job(model, mrml_scene, tmp_path):
    good = _blob_pair(mrml_scene, "good", 0)
    two_segments = _blob_pair(mrml_scene, "bad", 1, segment_names=("blob", "vessel"))
    with pytest.raises(BadInputError, match=r"Segment 'vessel' of segmentation 'bad segmentation' .* one of: blob"):
        adaptation.finetune_request(model, [good, two_segments], "tenvoo-l", OPTIONS)
    with pytest.raises(BadInputError, match="Segment 'vessel'"):
        adaptation.compare_request(model, two_segments.volume, two_segments.segmentation, tmp_path)
    with pytest.raises(BadInputError, match="Training pair 2 lacks"):
        adaptation.finetune_request(model, [good, adaptation.TrainingPair(good.volume, None)])
    with pytest.raises(BadInputError, match="Training pair 2 repeats training pair 1"):
        adaptation.finetune_request(model, [good, good], "tenvoo-l", OPTIONS)
    with pytest.raises(BadInputError, match="The validation volume 'good MR' is also a training volume"):
        adaptation.finetune_request(model, [good], "tenvoo-l", OPTIONS, validation=good)
    (tmp_path / "used" / "old adapter").mkdir(parents=True)
    with pytest.raises(BadInputError, match="used already exists and is not empty"):
        adaptation.finetune_request(model, [good], adapter_folder=tmp_path / "used")
    (tmp_path / "used" / "old adapter").rmdir()
    (tmp_path / "used").rmdir()
    label_map = tensor_to_volume_node(MetaTensor(torch.ones(1, 8, 8, 8, dtype=torch.int64)), "mask", scene=mrml_scene, label=True)
    with pytest.raises(BadInputError, match="The volume to segment 'mask' is a label map"):
        adaptation.infer_request(model, label_map)
    with pytest.raises(BadInputError, match="'mask' is a label map volume, not a segmentation. Convert it first"):
        adaptation.finetune_request(model, [good, adaptation.TrainingPair(good.volume, label_map)], "tenvoo-l", OPTIONS)
    nan = tensor_to_volume_node(MetaTensor(torch.full((1, 8, 8, 8), float("nan"))), "broken", scene=mrml_scene)
    with pytest.raises(BadInputError, match="The volume of training pair 2 'broken' has 512 NaN"):
        adaptation.finetune_request(model, [good, adaptation.TrainingPair(nan, good.segmentation)], "tenvoo-l", OPTIONS)
    (tmp_path / "generator" / "medgen_model.json").parent.mkdir()
    (tmp_path / "generator" / "medgen_model.json").write_text('{"task": "lmi-translation"}')
    with pytest.raises(BadInputError, match="holds a MedGen generative model .*, not a segmentation model"):
        adaptation.model_class_names(str(tmp_path / "generator"))
    (tmp_path / "generator" / "medgen_model.json").unlink()
    (tmp_path / "generator").rmdir()
    # deepbet's single class is "brain": a one-segment segmentation maps to it whatever its name
    assert adaptation.class_values(good.segmentation, adaptation.model_class_names("deepbet")) == {3: 1}
    assert list(tmp_path.iterdir()) == []


def test_cancelled_training_leaves_the_scene_unchanged(model, mrml_scene, tmp_path):
    pairs = [_blob_pair(mrml_scene, "case", 0)]
    before = scene_snapshot(mrml_scene)
    request = adaptation.finetune_request(model, pairs, "tenvoo-l", OPTIONS, steps=5000)
    job = SceneJob(request, tmp_path, device="cpu").start()
    cancel_once_running(job)
    assert job.wait(timeout_s=120) == ExitCode.CANCELLED
    assert job.import_results() == {}
    assert scene_snapshot(mrml_scene) == before


def test_a_trained_adapter_is_copied_whole_to_a_new_folder_and_nothing_is_overwritten(trained, tmp_path):
    adapter = trained["outputs"]["adapter"]
    kept = adaptation.save_adapter_copy(adapter, tmp_path / "kept" / "blob T2")
    assert kept == tmp_path / "kept" / "blob T2"
    assert sorted(path.name for path in kept.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    for path in kept.iterdir():
        assert path.read_bytes() == (adapter / path.name).read_bytes()
    empty = tmp_path / "kept" / "empty"
    empty.mkdir()
    assert adaptation.save_adapter_copy(kept, empty) == empty  # an existing empty folder is fine
    with pytest.raises(BadInputError, match="blob T2 already exists and is not empty"):
        adaptation.save_adapter_copy(adapter, kept)
    with pytest.raises(BadInputError, match="is not an adapter folder .*adapter_config.json"):
        adaptation.save_adapter_copy(tmp_path / "kept", tmp_path / "other")
    assert sorted(path.name for path in (tmp_path / "kept").iterdir()) == ["blob T2", "empty"]  # no staging left


def test_a_saved_adapter_is_checked_against_the_selected_base_model(trained, model, tmp_path):
    from medgen.models import save_model
    from monai.networks.nets import UNet

    summary = adaptation.check_adapter(model, trained["outputs"]["adapter"])
    assert summary["method"] == "tenvoo-l" and summary["options"] == OPTIONS and summary["trainable_parameters"] > 0
    assert adaptation.format_adapter(summary).startswith(
        f"tenvoo-l adapter (rank 2, exclude_first_last_conv False), {summary['trainable_parameters']:,} trained")
    torch.manual_seed(5)  # same architecture and classes, other weights
    other = tmp_path / "other model"
    save_model(UNet(**TINY_UNET_KWARGS), tiny_unet_spec(), other)
    with pytest.raises(ModelError, match=r"does not fit the selected model \(.*other model\).*SHA-256.*Select the model the adapter"):
        adaptation.check_adapter(str(other), trained["outputs"]["adapter"])
    with pytest.raises(BadInputError, match="does not exist"):
        adaptation.check_adapter(model, tmp_path / "nowhere")


def test_segments_map_to_model_classes_by_name_and_the_validation_pair_is_written_apart(mrml_scene, tmp_path):
    two = _blob_pair(mrml_scene, "two", 1, segment_names=("blob", "vessel"))  # segment values 3 and 4
    assert adaptation.class_values(two.segmentation, [" Vessel ", "blob"]) == {3: 2, 4: 1}
    training, validation = _blob_pair(mrml_scene, "train", 2), _blob_pair(mrml_scene, "held", 3)
    request = adaptation.FinetuneRequest("finetune", pairs=(training,), validation=validation, class_names=("tumour",))
    inputs = request.write_inputs(tmp_path)
    assert [Path(inputs[key]).name for key in ("val_image", "val_label")] == ["validation_image.nrrd", "validation_label.nrrd"]
    assert [Path(path).name for path in inputs["images"] + inputs["labels"]] == ["pair000_image.nrrd", "pair000_label.nrrd"]
    with pytest.raises(BadInputError, match="Train an adapter or choose its folder"):
        adaptation.compare_request("deepbet", None, None, None)
    rows = adaptation.dice_rows({"classes": ["blob"], "base_dice": [0.25], "adapted_dice": [0.75]})
    assert rows == [{"class": "blob", "base_dice": 0.25, "adapted_dice": 0.75}]
    assert adaptation.format_dice_rows(rows) == "blob: base 0.250 -> adapted 0.750"
    undrawn = adaptation.dice_rows({"classes": ["blob", "vessel"], "base_dice": [0.25, None], "adapted_dice": [0.75, None]})
    assert adaptation.format_dice_rows(undrawn) == "blob: base 0.250 -> adapted 0.750\nvessel: not drawn in the reference"
    assert (adaptation.method_options("lora", 4), adaptation.method_options("ia3", 4)) == ({"rank": 4}, {})


def test_a_replaced_head_numbers_the_classes_of_finetune_and_compare_requests(model, mrml_scene, tmp_path):
    """The job reads label maps with the adapted head's numbers (a fresh 3-channel head: "class 1", "class 2"), so
    the scene's segments must be written with them, not with the base model's ("blob" = 1)."""
    pair = _blob_pair(mrml_scene, "fresh head", 4, segment_names=("class 2",))
    head = {"head": "model.2.conv", "head_out_channels": 3}
    request = adaptation.finetune_request(model, [pair], "tenvoo-l", {**OPTIONS, **head})
    assert request.class_names == ("class 1", "class 2")
    label = load_volume(request.write_inputs(tmp_path / "inputs")["labels"][0], label=True)
    assert set(torch.unique(label.as_tensor()).tolist()) == {0, 2}
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"options": head}))
    assert adaptation.compare_request(model, pair.volume, pair.segmentation, adapter).class_names == ("class 1", "class 2")
    (adapter / "adapter_config.json").write_text("{broken")
    with pytest.raises(BadInputError, match="has no readable adapter_config.json"):
        adaptation.compare_request(model, pair.volume, pair.segmentation, adapter)
