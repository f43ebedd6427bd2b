"""Synthetic Data module, paired synthesis, on a real MRML scene: scene pairs -> trained model -> imported pairs.

The worker runs for real (tiny model, FAST settings); one model is trained per file and shared.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medgen_testing import cancel_once_running, make_mrml_scene, oblique_affine, scene_snapshot
from medgen.errors import BadInputError
from medgen.io import load_volume
from medgen.jobs.exit_codes import ExitCode
from medgen.labels import LabelInfo, load_labels
from medgen.slicer.scene import subject_hierarchy
from medgen.slicer.scene_job import SceneJob, SceneJobLogicMixin
from medgen.slicer.segmentations import labelmap_to_segmentation, segment_labels
from medgen.slicer.volumes import ijk_to_ras_of, tensor_to_volume_node

slicer = pytest.importorskip("slicer")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedGenSynthesis"))
from MedGenSynthesisLib import paired  # noqa: E402  (the module folder is what Slicer puts on sys.path)

FAST = dict(vae_phase1_steps=4, vae_phase2_steps=2, ldm_steps=4, checkpoint_every=2)
CAVITY, WALL = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)


def _phantom_pair(scene, name: str, affine: np.ndarray, labels: list[LabelInfo], seed: int):
    """A volume with a dark cavity in a bright wall, and its segmentation (values from ``labels``: cavity, wall)."""
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, 16)] * 3, indexing="ij"))
    radius = grid.pow(2).sum(0).sqrt()
    cavity_value, wall_value = (label.value for label in labels)
    label = torch.zeros(1, 16, 16, 16, dtype=torch.int64)
    label[0][radius < 1.2] = wall_value
    label[0][radius < 0.7] = cavity_value
    noise = 0.05 * torch.randn((1, 16, 16, 16), generator=torch.Generator().manual_seed(seed))
    image = torch.where(label == cavity_value, 0.2, torch.where(label == wall_value, 0.8, 0.05)) + noise
    affine_tensor = torch.from_numpy(affine)
    volume = tensor_to_volume_node(MetaTensor(image, affine=affine_tensor), f"{name} MR", scene=scene)
    segmentation = labelmap_to_segmentation(MetaTensor(label, affine=affine_tensor), labels, f"{name} segmentation",
                                            scene=scene, reference_node=volume)
    return paired.TrainingPair(volume, segmentation)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two scene pairs whose segmentations number the same structures differently, trained through the worker."""
    scene = next(scenes := make_mrml_scene())
    pairs = [
        _phantom_pair(scene, "case A", oblique_affine(), [LabelInfo("cavity", 1, CAVITY), LabelInfo("wall", 2, WALL)], 0),
        # the second case labels the same structures 7 and 4, with other colours, on another grid
        _phantom_pair(scene, "case B", np.diag([1.2, 1.1, 1.0, 1.0]),
                      [LabelInfo("cavity", 7, (0.5, 0.5, 0.5)), LabelInfo("wall", 4, (0.0, 0.0, 1.0))], 1),
    ]
    job_root = tmp_path_factory.mktemp("jobs")
    model_folder = tmp_path_factory.mktemp("models") / "phantom model"
    request = paired.train_request_from_scene(pairs, shape=[16, 16, 16], preset="tiny", model_folder=model_folder, **FAST)
    events = []
    job = SceneJob(request, job_root, device="cpu", on_event=events.append).start()
    assert job.wait(timeout_s=600) == ExitCode.OK, job.runner.error
    yield {"model": job.import_results()["model"], "events": events, "inputs": next(job_root.glob("inputs-*"))}
    next(scenes, None)


def test_training_pairs_share_labels_by_segment_name(trained):
    inputs = trained["inputs"]
    assert load_labels(inputs / "labels.json") == [LabelInfo("cavity", 1, CAVITY), LabelInfo("wall", 2, WALL)]
    first, second = (load_volume(inputs / f"pair00{i}_label.nrrd", label=True) for i in range(2))
    assert torch.equal(torch.unique(second), torch.tensor([0, 1, 2]))
    # each label map stays on its own volume's grid, and the same voxels mean the same structure
    assert torch.equal(first.as_tensor(), second.as_tensor())
    np.testing.assert_allclose(second.affine.numpy(), np.diag([1.2, 1.1, 1.0, 1.0]), atol=1e-6)


def test_training_reports_every_phase_and_moves_the_model_where_asked(trained):
    phases = {event["phase"] for event in trained["events"] if event["event"] == "progress"}
    assert {"vae", "latents", "ldm"} <= phases
    assert any("loss" in event for event in trained["events"] if event.get("phase") == "ldm")
    model = trained["model"]
    assert model.name == "phantom model"
    document = json.loads((model / "medgen_model.json").read_text())
    assert [(label["name"], tuple(label["color"])) for label in document["labels"]] == [("cavity", CAVITY), ("wall", WALL)]


def test_generated_pairs_come_back_named_coloured_on_the_model_grid_in_one_folder(trained, mrml_scene, tmp_path):
    nnunet_raw = tmp_path / "nnUNet_raw"
    request = paired.generate_request(trained["model"], 2, seed=1, steps=4, nnunet_folder=nnunet_raw,
                                      nnunet_dataset_id=42, nnunet_name="Phantoms")
    nodes = SceneJobLogicMixin().runJob(request, jobRoot=tmp_path / "jobs", device="cpu")

    volumes = [nodes["image_0000"], nodes["image_0001"]]
    segmentations = [nodes["label_0000"], nodes["label_0001"]]
    assert [node.GetClassName() for node in volumes] == ["vtkMRMLScalarVolumeNode"] * 2
    assert [node.GetClassName() for node in segmentations] == ["vtkMRMLSegmentationNode"] * 2
    document = json.loads((trained["model"] / "medgen_model.json").read_text())
    for volume, segmentation in zip(volumes, segmentations):
        assert sorted(segment_labels(segmentation), key=lambda label: label.value) == [
            LabelInfo("cavity", 1, CAVITY), LabelInfo("wall", 2, WALL)]
        np.testing.assert_allclose(ijk_to_ras_of(volume), document["affine"], atol=1e-5)
        assert list(volume.GetImageData().GetDimensions()) == document["grid_shape"]
        assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is volume

    hierarchy = subject_hierarchy(mrml_scene)
    (folder,) = {hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) for node in volumes + segmentations}
    assert hierarchy.GetItemName(folder).startswith("synthesize-")
    assert hierarchy.GetItemParent(folder) == hierarchy.GetSceneItemID()

    dataset = nnunet_raw / "Dataset042_Phantoms"
    assert nodes["nnunet_dataset"] == dataset
    assert json.loads((dataset / "dataset.json").read_text())["labels"] == {"background": 0, "cavity": 1, "wall": 2}
    assert len(list((dataset / "labelsTr").glob("*.nii.gz"))) == 2


def test_cancelled_generation_leaves_the_scene_unchanged(trained, mrml_scene, tmp_path):
    before = scene_snapshot(mrml_scene)
    job = SceneJob(paired.generate_request(trained["model"], 50, steps=500), tmp_path, device="cpu").start()
    cancel_once_running(job)
    assert job.wait(timeout_s=120) == ExitCode.CANCELLED
    assert job.import_results() == {}
    assert scene_snapshot(mrml_scene) == before


def test_segment_names_match_across_pairs_whatever_their_case_and_spaces(mrml_scene):
    label = torch.zeros(1, 8, 8, 8, dtype=torch.int64)
    label[0, 2:5, 2:5, 2:5] = 1
    first, second = (labelmap_to_segmentation(MetaTensor(label), [LabelInfo(name, 1, CAVITY)], f"seg {n}", scene=mrml_scene)
                     for n, name in enumerate(("liver", "Liver ")))
    assert [(label.name, label.value) for label in paired.training_labels([first, second])] == [("liver", 1)]


def test_pair_without_segments_is_refused_before_any_job_starts(mrml_scene, tmp_path):
    good = _phantom_pair(mrml_scene, "case A", oblique_affine(), [LabelInfo("cavity", 1, CAVITY), LabelInfo("wall", 2, WALL)], 0)
    empty = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nothing drawn")
    with pytest.raises(BadInputError, match="Training pair 2: segmentation 'nothing drawn' has no segments"):
        paired.train_request_from_scene([good, paired.TrainingPair(good.volume, empty)], shape=[16, 16, 16])
    flat = tensor_to_volume_node(MetaTensor(torch.full((1, 8, 8, 1), 2.0)), "flat slice", scene=mrml_scene)
    with pytest.raises(BadInputError, match="The volume of training pair 2 'flat slice' is 8x8x1 voxels"):
        paired.train_request_from_scene([good, paired.TrainingPair(flat, good.segmentation)], shape=[16, 16, 16])
    with pytest.raises(BadInputError, match=r"Training pair 2 repeats training pair 1 \('case A MR' with 'case A segmentation'\)"):
        paired.train_request_from_scene([good, good], shape=[16, 16, 16])
    label_map = tensor_to_volume_node(MetaTensor(torch.ones(1, 8, 8, 8, dtype=torch.int64)), "mask", scene=mrml_scene, label=True)
    with pytest.raises(BadInputError, match="'mask' is a label map volume, not a segmentation"):
        paired.train_request_from_scene([good, paired.TrainingPair(good.volume, label_map)], shape=[16, 16, 16])
    background = _phantom_pair(mrml_scene, "case B", oblique_affine(), [LabelInfo("cavity", 1, CAVITY), LabelInfo(" Background", 2, WALL)], 1)
    with pytest.raises(BadInputError, match="Training pair 2: segment 2 of 'case B segmentation' is named ' Background'"):
        paired.train_request_from_scene([good, background], shape=[16, 16, 16])
    assert list(tmp_path.iterdir()) == []


def test_generation_refuses_an_existing_nnunet_dataset(trained, tmp_path):
    (tmp_path / "Dataset042_Phantoms" / "imagesTr").mkdir(parents=True)
    with pytest.raises(BadInputError, match="Dataset042_Phantoms already exists"):
        paired.generate_request(trained["model"], 2, nnunet_folder=tmp_path, nnunet_dataset_id=42, nnunet_name="Phantoms")
    # the id under another name: nnU-Net would refuse both datasets ("More than one dataset name found")
    with pytest.raises(BadInputError, match="nnU-Net dataset id 42 is taken by Dataset042_Phantoms"):
        paired.generate_request(trained["model"], 2, nnunet_folder=tmp_path, nnunet_dataset_id=42, nnunet_name="Other")
    with pytest.raises(BadInputError, match="DDIM steps must divide the model's 1000 training timesteps.*got 300, use e.g. 200 or 250"):
        paired.generate_request(trained["model"], 2, steps=300)
