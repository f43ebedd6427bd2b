"""Synthetic Data module, "From masks", on a real MRML scene: masks out of segmentations, accepted pairs in.

The job folders imported here are written by the test exactly as the ``maskgen`` job lays them out;
one slow test runs the real tiny ``maskgen-train`` and ``maskgen`` jobs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medgen_testing import oblique_affine, scene_snapshot
from medgen.errors import BadInputError, ModelError
from medgen.io import load_volume, save_volume
from medgen.io.model_folder import write_model_json
from medgen.labels import LabelInfo, load_labels, save_labels
from medgen.slicer.scene import subject_hierarchy
from medgen.slicer.scene_job import TrainingPair, check_scene_inputs_remain
from medgen.slicer.segmentations import labelmap_to_segmentation, segment_labels
from medgen.slicer.volumes import ijk_to_ras_of, tensor_to_volume_node, volume_node_to_tensor
from medgen.synthesis.filtering import CandidateScore, FilterThresholds, select_candidates

slicer = pytest.importorskip("slicer")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedGenSynthesis"))
from MedGenSynthesisLib import candidate_report, from_masks  # noqa: E402  (the module folder is what Slicer puts on sys.path)

LIVER, SPLEEN, KIDNEY = (0.8, 0.4, 0.3), (0.2, 0.3, 0.9), (0.9, 0.9, 0.1)
ORGANS = [LabelInfo("liver", 1, LIVER), LabelInfo("spleen", 2, SPLEEN), LabelInfo("kidney", 3, KIDNEY)]


def _model_folder(folder: Path, organs=ORGANS) -> Path:
    """A model folder as ``maskgen-train`` describes it (weights are not needed to plan or import a job)."""
    folder.mkdir(parents=True)
    names = [organ.name for organ in organs]
    prompts = {modality: {"modality": modality, "attributes": "", "region": "abdomen", "organs": names}
               for modality in ("CT", "T2 MRI")}
    write_model_json(folder, "mask-conditioned-ldm", organs=[{"name": o.name, "value": o.value, "color": list(o.color)} for o in organs],
                     prompts=prompts, source_modality="CT", target_modality="T2 MRI", grid_shape=[16, 16, 16])
    return folder


def _segmented_volume(scene, name: str, segments: list[LabelInfo], affine=None):
    """A 16x12x10 volume and a segmentation drawn on it: one 3-voxel-thick slab per segment along I."""
    affine = torch.from_numpy(oblique_affine() if affine is None else affine)
    image = torch.rand((1, 16, 12, 10), generator=torch.Generator().manual_seed(0))
    label = torch.zeros(1, 16, 12, 10, dtype=torch.int64)
    for index, segment in enumerate(segments):
        label[0, 2 + 4 * index : 5 + 4 * index, 2:10, 2:8] = segment.value
    volume = tensor_to_volume_node(MetaTensor(image, affine=affine), f"{name} CT", scene=scene)
    segmentation = labelmap_to_segmentation(MetaTensor(label, affine=affine), segments, f"{name} segmentation",
                                            scene=scene, reference_node=volume)
    return volume, segmentation, label


def _score(mask_id: str, candidate: int, iou: float, confidence: float, absent=()) -> CandidateScore:
    organs = [organ.name for organ in ORGANS]
    return CandidateScore(mask_id, candidate, {o: 0.0 if o in absent else iou for o in organs},
                          {o: 0.0 if o in absent else confidence for o in organs},
                          {o: 0.0 if o in absent else 2 * iou / (1 + iou) for o in organs}, tuple(absent))


def _mask_entry(mask_id: str, scores: list[CandidateScore], pairs: list[str]) -> dict:
    """One mask of ``report.json`` as the job writes it (statuses, decisions, reasons)."""
    decision = select_candidates(scores, FilterThresholds())
    accepted = {score.candidate for score in decision.accepted}
    return {
        "mask_id": mask_id, "status": "accepted" if accepted else "none accepted", "path": decision.path,
        "candidates": [{**score.to_dict(), "decision": "accepted" if score.candidate in accepted else "rejected",
                        "reason": decision.rejected.get(score.candidate, "")} for score in scores],
        "pairs": [{"image": f"{pair}_image.nii.gz", "label": f"{pair}_label.nii.gz"} for pair in pairs],
    }


def _finished_job(job_root: Path, affine: np.ndarray, pairs: dict[str, int], report: dict | None) -> Path:
    """A ``maskgen`` job folder: ``outputs/pairs/{mask_id}_{k}_image|label.nii.gz`` + ``labels.json``, ``outputs/report.json``.

    Args:
        pairs: pair id -> the organ value painted into its label map.
    """
    outputs = job_root / "maskgen-20261123-010203-abcdef" / "outputs"
    pairs_dir = outputs / "pairs"
    pairs_dir.mkdir(parents=True)
    for index, (pair_id, value) in enumerate(pairs.items()):
        image = torch.full((1, 12, 10, 8), float(index + 1))
        label = torch.zeros(1, 12, 10, 8, dtype=torch.int64)
        label[0, 3:9, 2:8, 2:6] = value
        save_volume(MetaTensor(image, affine=torch.from_numpy(affine)), pairs_dir / f"{pair_id}_image.nii.gz")
        save_volume(MetaTensor(label, affine=torch.from_numpy(affine)), pairs_dir / f"{pair_id}_label.nii.gz", label=True)
    save_labels(ORGANS, pairs_dir / "labels.json")
    if report is not None:
        (outputs / "report.json").write_text(json.dumps(report))
    return outputs


def _report() -> dict:
    strong = [_score("case_A", k, 0.95 - 0.01 * k, 0.95) for k in range(3)]
    weak = [_score("case_B", k, 0.3, 0.5, absent=("kidney",)) for k in range(2)]
    masks = [_mask_entry("case_A", strong, ["case_A_0", "case_A_1"]), _mask_entry("case_B", weak, []),
             {"mask_id": "case_C", "status": "skipped: empty mask", "path": None, "candidates": [], "pairs": []}]
    return {"prompt": "T2 MRI, abdomen, liver, spleen, kidney", "candidates": 3, "masks": masks, "accepted_pairs": 2}


# ------------------------------------------------------------------------------------------ the request


def test_a_segmentation_becomes_a_mask_in_model_organ_values_on_its_exact_oblique_grid(mrml_scene, tmp_path):
    model = _model_folder(tmp_path / "model")
    # the scene numbers the organs differently from the model (spleen 5, liver 7): names decide
    segments = [LabelInfo("spleen", 5, SPLEEN), LabelInfo("Liver ", 7, LIVER)]
    volume, segmentation, label = _segmented_volume(mrml_scene, "case A", segments)
    request = from_masks.generate_request(model, [segmentation], "T2 MRI", candidates=6, chunk=3, steps=5, seed=4,
                                          thresholds={"avg_iou": 0.5})
    inputs = request.write_inputs(tmp_path / "inputs")

    (mask_file,) = inputs["masks"]
    assert Path(mask_file).name == "case_A_segmentation.nii.gz" and inputs["model"] == str(model)
    mask = load_volume(mask_file, label=True)
    np.testing.assert_allclose(mask.affine.numpy(), ijk_to_ras_of(volume), atol=1e-5)
    expected = torch.zeros_like(label)
    expected[label == 5], expected[label == 7] = 2, 1
    assert torch.equal(mask.as_tensor(), expected)
    assert request.params == {
        "target_modality": "T2 MRI", "candidates": 6, "chunk": 3, "steps": 5, "guidance_scale": 7.0,
        "conditioning_scale": 1.0, "thresholds": {**from_masks.DEFAULT_THRESHOLDS, "avg_iou": 0.5}, "nnunet_dataset_id": None,
    }
    assert request.seed == 4 and request.kind == "maskgen"


def test_mask_files_are_named_after_their_nodes_in_any_script(mrml_scene, tmp_path):
    model = _model_folder(tmp_path / "model")
    masks = [_segmented_volume(mrml_scene, name, [LabelInfo("liver", 1, LIVER)])[1] for name in ("肝臓 1", "Leber/2", "?!")]
    inputs = from_masks.generate_request(model, masks, "T2 MRI").write_inputs(tmp_path / "inputs")
    assert [Path(path).name for path in inputs["masks"]] == [
        "肝臓_1_segmentation.nii.gz", "Leber_2_segmentation.nii.gz", "segmentation.nii.gz"]


def test_an_unknown_segment_name_is_refused_listing_the_segments_and_the_organs(mrml_scene, tmp_path):
    model = _model_folder(tmp_path / "model")
    _, segmentation, _ = _segmented_volume(mrml_scene, "case A", [LabelInfo("liver", 1, LIVER), LabelInfo("tumour", 2, SPLEEN)])
    with pytest.raises(BadInputError) as error:
        from_masks.generate_request(model, [segmentation], "T2 MRI")
    message = str(error.value)
    assert "['tumour']" in message and "['liver', 'tumour']" in message and "['liver', 'spleen', 'kidney']" in message
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


def test_a_mask_without_reference_volume_and_an_unknown_modality_are_refused(mrml_scene, tmp_path):
    model = _model_folder(tmp_path / "model")
    _, segmentation, _ = _segmented_volume(mrml_scene, "case A", [LabelInfo("liver", 1, LIVER)])
    with pytest.raises(BadInputError, match="The model does not know the modality 'PET'"):
        from_masks.generate_request(model, [segmentation], "PET")
    segmentation.RemoveNodeReferenceIDs(segmentation.GetReferenceImageGeometryReferenceRole())
    with pytest.raises(BadInputError, match="'case A segmentation' has no reference volume"):
        from_masks.generate_request(model, [segmentation], "T2 MRI")


def test_masks_from_a_folder_and_an_nnunet_export_go_into_the_job_as_files(tmp_path):
    model = _model_folder(tmp_path / "model")
    masks = tmp_path / "masks"
    masks.mkdir()
    for name in ("b.nii.gz", "a.nrrd", "notes.txt"):
        (masks / name).write_bytes(b"")
    request = from_masks.generate_request(model, mask_folder=masks, nnunet_folder=tmp_path / "raw", nnunet_dataset_id=7,
                                          nnunet_name="Livers", checker_folder=tmp_path / "checker")
    assert request.input_files == {"model": str(model), "masks": [str(masks / "a.nrrd"), str(masks / "b.nii.gz")],
                                   "checker": str(tmp_path / "checker")}
    assert request.params["target_modality"] == "T2 MRI"  # the model's own target modality by default
    assert (request.params["nnunet_dataset_id"], request.params["nnunet_name"]) == (7, "Livers")
    (tmp_path / "raw" / "Dataset007_Livers" / "imagesTr").mkdir(parents=True)
    with pytest.raises(BadInputError, match="Dataset007_Livers already exists"):
        from_masks.generate_request(model, mask_folder=masks, nnunet_folder=tmp_path / "raw", nnunet_dataset_id=7, nnunet_name="Livers")
    with pytest.raises(BadInputError, match="Thresholds are fractions"):
        from_masks.generate_request(model, mask_folder=masks, thresholds={"organ_iou": 1.5})


def test_model_info_names_organs_and_modalities_and_refuses_other_models(tmp_path):
    info = from_masks.model_info(_model_folder(tmp_path / "model"))
    assert info.organs == tuple(ORGANS) and info.organ_names == ["liver", "spleen", "kidney"]
    assert info.target_modalities == ("T2 MRI", "CT") and info.source_modality == "CT"
    write_model_json(tmp_path / "joint", "joint-image-label-ldm")
    with pytest.raises(ModelError, match="'mask-conditioned-ldm' model is needed"):
        from_masks.model_info(tmp_path / "joint")
    write_model_json(tmp_path / "damaged", "mask-conditioned-ldm")
    with pytest.raises(ModelError, match="incomplete or damaged \\(KeyError: 'organs'\\)"):
        from_masks.model_info(tmp_path / "damaged")


def test_training_writes_source_pairs_by_segment_name_and_target_volumes(mrml_scene, tmp_path):
    first = _segmented_volume(mrml_scene, "case A", [LabelInfo("liver", 3, LIVER), LabelInfo("spleen", 9, SPLEEN)])
    second = _segmented_volume(mrml_scene, "case B", [LabelInfo("spleen", 1, SPLEEN)], affine=np.diag([1.2, 1.1, 1.0, 1.0]))
    target = tensor_to_volume_node(MetaTensor(torch.rand(1, 8, 8, 8), affine=torch.eye(4, dtype=torch.float64)), "T2", scene=mrml_scene)
    request = from_masks.train_request([TrainingPair(first[0], first[1]), TrainingPair(second[0], second[1])], [target],
                                       source_modality="CT", target_modality="T2 MRI", region="abdomen", shape=[16, 16, 8],
                                       encoding="merged", model_folder=tmp_path / "model", controlnet_steps=3)
    inputs = request.write_inputs(tmp_path / "inputs")

    assert load_labels(inputs["label_names"]) == [LabelInfo("liver", 1, LIVER), LabelInfo("spleen", 2, SPLEEN)]
    labels = [load_volume(path, label=True) for path in inputs["source_labels"]]
    assert [torch.unique(label).tolist() for label in labels] == [[0, 1, 2], [0, 2]]
    np.testing.assert_allclose(labels[1].affine.numpy(), np.diag([1.2, 1.1, 1.0, 1.0]), atol=1e-6)
    assert len(inputs["source_images"]) == 2
    (target_file,) = inputs["target_images"]
    assert torch.allclose(load_volume(target_file).as_tensor(), volume_node_to_tensor(target).as_tensor())
    assert request.params == {"shape": [16, 16, 8], "spacing_mm": None, "preset": "tiny", "source_modality": "CT",
                              "target_modality": "T2 MRI", "region": "abdomen", "encoding": "merged", "controlnet_steps": 3}
    assert request.kind == "maskgen-train" and request.model_folder == tmp_path / "model"


def test_training_from_folders_names_organs_from_dataset_json(tmp_path):
    source = tmp_path / "Dataset001_CT"
    for sub, name in (("imagesTr", "c1_0000.nii.gz"), ("labelsTr", "c1.nii.gz")):
        (source / sub).mkdir(parents=True, exist_ok=True)
        (source / sub / name).write_bytes(b"")
    (source / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "spleen": 2}}))
    targets = tmp_path / "t2"
    targets.mkdir()
    (targets / "t1.nii.gz").write_bytes(b"")
    request = from_masks.train_request(source_folder=source, target_folder=targets, source_modality="CT", target_modality="T2")
    inputs = request.write_inputs(tmp_path / "inputs")
    assert inputs["source_images"] == [str(source / "imagesTr" / "c1_0000.nii.gz")]
    assert inputs["source_labels"] == [str(source / "labelsTr" / "c1.nii.gz")]
    assert inputs["target_images"] == [str(targets / "t1.nii.gz")]
    assert [label.name for label in load_labels(inputs["label_names"])] == ["liver", "spleen"]
    # nnU-Net v1 / MSD names labels the other way round; region labels are not organs
    (source / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver", "2": "spleen"}}))
    request = from_masks.train_request(source_folder=source, target_folder=targets, source_modality="CT", target_modality="T2")
    assert [label.name for label in load_labels(request.write_inputs(tmp_path / "v1")["label_names"])] == ["liver", "spleen"]
    # a v2 file naming its labels by number, and values written as strings or floats, keep their meaning
    (source / "dataset.json").write_text(json.dumps({"labels": {"0": 0, "3": 1, "1": "2", "2": 3.0}}))
    request = from_masks.train_request(source_folder=source, target_folder=targets, source_modality="CT", target_modality="T2")
    assert [(label.name, label.value) for label in load_labels(request.write_inputs(tmp_path / "v2")["label_names"])] == [
        ("3", 1), ("1", 2), ("2", 3)]
    (source / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": [1, 2]}}))
    with pytest.raises(BadInputError, match=r"dataset.json does not name its labels as expected .*regions"):
        from_masks.train_request(source_folder=source, target_folder=targets, source_modality="CT", target_modality="T2")


@pytest.mark.parametrize("settings, message", [
    (dict(source_modality="T2", target_modality="T2"), "Source and target modality are both 'T2'"),
    (dict(source_modality="", target_modality="T2"), "Name the source and the target modality"),
    (dict(source_modality="CT", target_modality="T2", encoding="rgb"), "Unknown mask encoding 'rgb'"),
])
def test_training_refuses_unusable_settings(mrml_scene, tmp_path, settings, message):
    volume, segmentation, _ = _segmented_volume(mrml_scene, "case A", [LabelInfo("liver", 1, LIVER)])
    with pytest.raises(BadInputError, match=message):
        from_masks.train_request([TrainingPair(volume, segmentation)], [volume], **settings)
    with pytest.raises(BadInputError, match="No target-modality data"):
        from_masks.train_request([TrainingPair(volume, segmentation)], [], source_modality="CT", target_modality="T2")


def test_repeated_selections_are_refused(mrml_scene, tmp_path):
    model = _model_folder(tmp_path / "model")
    volume, segmentation, _ = _segmented_volume(mrml_scene, "case A", [LabelInfo("liver", 1, LIVER)])
    with pytest.raises(BadInputError, match=r"Target-modality volume 2 repeats target-modality volume 1 \('case A CT'\)"):
        from_masks.train_request([TrainingPair(volume, segmentation)], [volume, volume], source_modality="CT", target_modality="T2")
    with pytest.raises(BadInputError, match=r"Mask 2 repeats mask 1 \('case A segmentation'\)"):
        from_masks.generate_request(model, [segmentation, segmentation], "T2 MRI")
    with pytest.raises(BadInputError, match="'case A CT' is a .*, not a segmentation"):
        from_masks.generate_request(model, [volume], "T2 MRI")


# ------------------------------------------------------------------------------------------ the import


def test_a_finished_job_loads_every_accepted_pair_named_coloured_on_its_grid_in_one_folder(mrml_scene, tmp_path):
    request = from_masks.generate_request(_model_folder(tmp_path / "model"), mask_folder=_mask_folder(tmp_path))
    affine = oblique_affine(spacing=(1.5, 1.5, 3.0))
    outputs = _finished_job(tmp_path / "jobs", affine, {"case_A_0": 1, "case_A_1": 2}, _report())
    imported = request.import_results({"outputs": {"pairs": str(outputs / "pairs"), "report": str(outputs / "report.json")}})

    assert list(imported["pairs"]) == ["case_A_0", "case_A_1"]
    hierarchy = subject_hierarchy(mrml_scene)
    for index, (pair_id, (volume, segmentation)) in enumerate(imported["pairs"].items()):
        assert volume.GetName() == f"{pair_id} T2 MRI" and segmentation.GetName() == f"{pair_id} T2 MRI segmentation"
        np.testing.assert_allclose(ijk_to_ras_of(volume), affine, atol=1e-5)
        assert float(slicer.util.arrayFromVolume(volume).mean()) == pytest.approx(index + 1)
        assert sorted(segment_labels(segmentation), key=lambda label: label.value) == ORGANS
        assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is volume
    nodes = [node for pair in imported["pairs"].values() for node in pair]
    (folder,) = {hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) for node in nodes}
    assert hierarchy.GetItemName(folder) == "maskgen-20261123-010203-abcdef"
    assert imported["report"] == _report()
    assert [(row.mask, row.candidate, row.decision) for row in imported["candidates"]][:3] == [
        ("case_A", 0, "accepted"), ("case_A", 1, "accepted"), ("case_A", 2, "rejected")]


def test_pairs_of_a_mask_under_a_transform_stay_aligned_with_it(mrml_scene, tmp_path):
    """Masks are exported on their reference volume's local grid, so their pairs go under its parent transform
    (a registration): otherwise a generated image would sit 30 mm away from the mask it was drawn for."""
    liver = [LabelInfo("liver", 1, LIVER)]
    moved, moved_segmentation, _ = _segmented_volume(mrml_scene, "case A", liver)
    _, still_segmentation, _ = _segmented_volume(mrml_scene, "case B", liver)
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(np.array(
        [[1, 0, 0, 30], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)))
    moved.SetAndObserveTransformNodeID(transform.GetID())
    moved_segmentation.SetAndObserveTransformNodeID(transform.GetID())
    request = from_masks.generate_request(_model_folder(tmp_path / "model"), [moved_segmentation, still_segmentation])
    assert list(request.mask_stems()) == ["case_A_segmentation", "case_B_segmentation"]
    request.write_inputs(tmp_path / "inputs")
    still_segmentation.SetName("renamed while the job ran")  # the pairs keep the names they were generated under
    mrml_scene.RemoveNode(moved_segmentation)  # deleted while the job ran: its pairs still follow its volume's transform
    outputs = _finished_job(tmp_path / "jobs", oblique_affine(), {"case_A_segmentation_0": 1, "case_B_segmentation_3": 1}, None)
    mrml_scene.RemoveNode(still_segmentation)
    check_scene_inputs_remain(request, {"outputs": {"pairs": str(outputs / "pairs")}})  # no mask left, their volumes are
    pairs = request.import_pairs(outputs)["pairs"]
    (moved_image, moved_pair_segmentation), (still_image, still_pair_segmentation) = pairs.values()
    assert moved_image.GetTransformNodeID() == transform.GetID() == moved_pair_segmentation.GetTransformNodeID()
    assert still_image.GetTransformNodeID() is None and still_pair_segmentation.GetTransformNodeID() is None


def test_long_node_names_make_short_unique_file_stems(mrml_scene, tmp_path):
    liver = [LabelInfo("liver", 1, LIVER)]
    long_name = "Segmentation of the liver from the registered follow-up scan, second reader " * 4
    segmentations = [_segmented_volume(mrml_scene, long_name + suffix, liver)[1] for suffix in ("A", "B")]
    request = from_masks.generate_request(_model_folder(tmp_path / "model"), segmentations)
    stems = list(request.mask_stems())
    assert len(set(stems)) == 2 and all(len(stem.encode()) <= 150 for stem in stems)
    assert stems[0].startswith("Segmentation_of_the_liver")


def _mask_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "masks"
    folder.mkdir()
    (folder / "case_A.nii.gz").write_bytes(b"")
    return folder


def test_a_cancelled_job_loads_only_the_complete_pairs_it_kept(mrml_scene, tmp_path):
    request = from_masks.generate_request(_model_folder(tmp_path / "model"), mask_folder=_mask_folder(tmp_path))
    outputs = _finished_job(tmp_path / "jobs", oblique_affine(), {"case_A_0": 1, "case_A_4": 3}, None)
    # the cancel came between the image and the label map of a pair, and during another file's write
    (outputs / "pairs" / "case_A_4_label.nii.gz").unlink()
    (outputs / "pairs" / ".case_B_2_image.nii.abc123.part.nii.gz").write_bytes(b"")
    imported = request.import_pairs(outputs)
    assert list(imported["pairs"]) == ["case_A_0"] and imported["report"] is None and imported["candidates"] == []
    assert candidate_report.summary(imported) == "1 pair(s) accepted"


def test_a_cancel_before_any_acceptance_or_a_broken_file_leaves_the_scene_unchanged(mrml_scene, tmp_path):
    request = from_masks.generate_request(_model_folder(tmp_path / "model"), mask_folder=_mask_folder(tmp_path))
    hierarchy = subject_hierarchy(mrml_scene)
    before, items_before = scene_snapshot(mrml_scene), hierarchy.GetNumberOfItems()
    assert request.import_pairs(tmp_path / "never-started" / "outputs")["pairs"] == {}
    outputs = _finished_job(tmp_path / "jobs", oblique_affine(), {"case_A_0": 1, "case_A_1": 2}, None)
    (outputs / "pairs" / "case_A_1_label.nii.gz").write_bytes(b"not a volume")
    with pytest.raises(BadInputError):
        request.import_pairs(outputs)
    assert scene_snapshot(mrml_scene) == before and hierarchy.GetNumberOfItems() == items_before


# -------------------------------------------------------------------------------- the table and progress


def test_candidate_rows_follow_the_report_with_scores_decisions_and_mask_status():
    rows = candidate_report.candidate_rows(_report())
    assert [(row.mask, row.candidate, row.decision, row.detail.split(":")[0]) for row in rows] == [
        ("case_A", 0, "accepted", "strict"), ("case_A", 1, "accepted", "strict"),
        ("case_A", 2, "rejected", "passes the strict thresholds but 2 better candidate(s) were kept"),
        ("case_B", 0, "rejected", "fails the relaxed thresholds"), ("case_B", 1, "rejected", "fails the relaxed thresholds"),
        ("case_C", None, "skipped: empty mask", ""),
    ]
    assert rows[0].avg_iou == pytest.approx(0.95) and rows[0].avg_confidence == pytest.approx(0.95)
    assert rows[0].organ_scores["spleen"] == pytest.approx({"iou": 0.95, "dice": 2 * 0.95 / 1.95, "confidence": 0.95})
    assert rows[3].organ_scores["kidney"] is None and rows[3].avg_iou == pytest.approx(0.3)

    headers, cells = candidate_report.table_cells(rows)
    assert headers == ["Mask", "Candidate", "Avg IoU", "Avg conf.", "liver IoU / conf.", "spleen IoU / conf.",
                       "kidney IoU / conf.", "Decision"]
    assert cells[1] == ["case_A", "1", "0.940", "0.950", "0.940 / 0.950", "0.940 / 0.950", "0.940 / 0.950", "accepted (strict)"]
    assert cells[3][6] == "absent" and cells[5] == ["case_C", "", "", "", "", "", "", "skipped: empty mask"]
    assert candidate_report.summary({"pairs": {"a": 1, "b": 2}, "report": _report()}) == (
        "2 pair(s) accepted from 3 mask(s); none accepted: case_B; skipped: case_C (empty mask)")


def test_progress_reads_per_mask_and_per_candidate():
    progress = candidate_report.GenerationProgress()
    assert progress.text() == "Waiting for the first mask..."
    progress.record({"event": "started", "job_dir": "/jobs/maskgen-1"})
    progress.record({"event": "progress", "phase": "denoising", "step": 20, "total": 50})
    progress.record({"event": "progress", "phase": "candidates", "step": 10, "total": 20})
    assert progress.text() == "denoising 20/50 | candidates 10/20" and progress.job_dir == Path("/jobs/maskgen-1")
    progress.record({"event": "progress", "phase": "masks", "step": 1, "total": 3})
    assert progress.text() == "masks done 1/3"
    progress.record({"event": "progress", "phase": "denoising", "step": 5, "total": 50})
    assert progress.text() == "masks done 1/3 | denoising 5/50"


# ------------------------------------------------------------------------------------------ end to end


def _lut_phantom(scene, name: str, lut, seed: int, affine: np.ndarray, segments: list[LabelInfo] | None):
    """A 16³ phantom: a large sphere (first segment) and a small one (second), intensities from ``lut``
    (background, large, small). Returns the volume and, when ``segments`` are given, its segmentation."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, 16)] * 3, indexing="ij"))
    organ = torch.zeros(16, 16, 16, dtype=torch.int64)
    organ[(grid - torch.tensor([-0.3, 0.0, 0.0]).view(3, 1, 1, 1)).pow(2).sum(0) < 0.2] = 1
    organ[(grid - torch.tensor([0.45, 0.0, 0.0]).view(3, 1, 1, 1)).pow(2).sum(0) < 0.08] = 2
    image = (torch.tensor(lut)[organ] + 0.03 * torch.randn((16, 16, 16), generator=generator)).clamp(0, 1)
    affine_tensor = torch.from_numpy(affine)
    volume = tensor_to_volume_node(MetaTensor(image[None], affine=affine_tensor), name, scene=scene)
    if segments is None:
        return volume, None
    label = torch.zeros_like(organ)
    for value, segment in enumerate(segments, start=1):
        label[organ == value] = segment.value
    return volume, labelmap_to_segmentation(MetaTensor(label[None], affine=affine_tensor), segments, f"{name} segmentation",
                                            scene=scene, reference_node=volume)


@pytest.mark.slow
def test_scene_masks_to_a_trained_model_to_accepted_pairs_through_the_real_jobs(mrml_scene, tmp_path):
    from medgen.slicer.scene_job import SceneJobLogicMixin

    lut_t1, lut_t2 = (0.1, 0.8, 0.5), (0.6, 0.2, 0.95)
    liver, kidney = LabelInfo("liver", 1, LIVER), LabelInfo("kidney", 2, KIDNEY)
    sources = [_lut_phantom(mrml_scene, f"T1 case {seed}", lut_t1, seed, np.eye(4), [liver, kidney]) for seed in range(2)]
    targets = [_lut_phantom(mrml_scene, f"T2 case {seed}", lut_t2, 10 + seed, np.eye(4), None)[0] for seed in range(2)]
    logic = SceneJobLogicMixin()
    training = from_masks.train_request([TrainingPair(*pair) for pair in sources], targets, source_modality="T1 MRI",
                                        target_modality="T2 MRI", region="abdomen", shape=[16, 16, 16],
                                        vae_steps=6, unet_steps=6, controlnet_steps=6, checkpoint_every=3)
    model = logic.runJob(training, jobRoot=tmp_path / "jobs", device="cpu")["model"]
    info = from_masks.model_info(model)
    assert info.organ_names == ["liver", "kidney"] and info.target_modalities[0] == "T2 MRI"

    # a new mask on an oblique grid, numbering the organs its own way
    _, mask = _lut_phantom(mrml_scene, "new T1", lut_t1, 5, oblique_affine(spacing=(1.0, 1.1, 1.2)),
                           [LabelInfo("Kidney", 9, KIDNEY), LabelInfo("liver", 4, LIVER)])
    accept_all = {"avg_confidence": 0.0, "avg_iou": 0.0, "organ_iou": 0.0, "organ_confidence": 0.0}
    generation = from_masks.generate_request(model, [mask], "T2 MRI", candidates=2, chunk=2, steps=2, thresholds=accept_all)
    imported = logic.runJob(generation, jobRoot=tmp_path / "jobs", device="cpu")

    assert list(imported["pairs"]) == ["new_T1_segmentation_0", "new_T1_segmentation_1"]
    # the mask's 1.1 and 1.2 mm axes (17.6 and 19.2 mm) reach beyond the model's field of view (16 voxels of 1 mm):
    # the pairs lie on the covered part of the mask's grid, from one voxel in on those axes
    reference = ijk_to_ras_of(mask.GetNodeReference(mask.GetReferenceImageGeometryReferenceRole()))
    covered = reference.copy()
    covered[:3, 3] += reference[:3, 1] + reference[:3, 2]
    for volume, segmentation in imported["pairs"].values():
        np.testing.assert_allclose(ijk_to_ras_of(volume), covered, atol=1e-5)
        assert volume.GetImageData().GetDimensions() == (16, 14, 13)  # VTK order: i, j, k
        assert {label.name for label in segment_labels(segmentation)} == {"liver", "kidney"}
    rows = imported["candidates"]
    assert [(row.mask, row.candidate, row.decision) for row in rows] == [
        ("new_T1_segmentation", 0, "accepted"), ("new_T1_segmentation", 1, "accepted")]
    assert imported["report"]["masks"][0]["status"] == "accepted"
