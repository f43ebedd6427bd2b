"""Synthetic Data panel: the pair table, Train/Generate turning into Cancel, and the From masks section
(target modalities from the model, the candidate table, loading pairs after a cancel), with Qt widgets faked."""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from monai.data import MetaTensor

from medgen.errors import BadInputError
from medgen.io import save_volume
from medgen.labels import LabelInfo, save_labels
from medgen.slicer.segmentations import labelmap_to_segmentation
from medgen.slicer.volumes import tensor_to_volume_node

REPOSITORY = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPOSITORY / "Testing" / "packaging"))
from slicer_stubs import fake_module_widget  # noqa: E402


@pytest.fixture
def panel(mrml_scene, monkeypatch):
    """The module widget on fake widgets (every name in the .ui), a real Logic whose jobs are recorded."""
    parameters = dict(
        inputVolume=None, device="cpu", outputFolder=Path("."), trainingSource="scene", trainingFolder=Path("."),
        modelOutputFolder=Path("."), shapeI=32, shapeJ=32, shapeK=16, preset="tiny", modelFolder=Path("."),
        pairCount=3, seed=7, samplingSteps=20, batchSize=2, nnunetFolder=Path("."), nnunetDatasetId=501,
        nnunetName="MedGenSynthetic",
    )
    with fake_module_widget("MedGenSynthesis", monkeypatch, parameters) as (widget, started):
        widget.setupPairedSynthesis()
        yield widget, started

def _pair_nodes(scene):
    volume = tensor_to_volume_node(MetaTensor(torch.rand(1, 8, 8, 8)), "case MR", scene=scene)
    label = torch.zeros(1, 8, 8, 8, dtype=torch.int64)
    label[0, 2:5, 2:5, 2:5] = 1
    segmentation = labelmap_to_segmentation(MetaTensor(label), [LabelInfo("lesion", 1, (1.0, 0.0, 0.0))], "case seg", scene=scene)
    return volume, segmentation


def test_pair_rows_hold_a_volume_and_a_segmentation_selector_on_the_scene(panel, mrml_scene):
    widget, _ = panel
    widget.onAddPairButton()
    widget.onAddPairButton()
    table = widget.ui.trainingPairsTable
    assert table.rowCount == 2
    assert [table.cellWidget(0, column).nodeTypes for column in (0, 1)] == [["vtkMRMLScalarVolumeNode"], ["vtkMRMLSegmentationNode"]]
    assert all(table.cellWidget(1, column).scene is mrml_scene for column in (0, 1))
    table.selected = 0
    widget.onRemovePairButton()
    assert table.rowCount == 1


def test_train_starts_on_the_table_pairs_then_cancels(panel, mrml_scene):
    widget, started = panel
    volume, segmentation = _pair_nodes(mrml_scene)
    widget.onAddPairButton()
    widget.ui.trainingPairsTable.cellWidget(0, 0).node = volume
    widget.ui.trainingPairsTable.cellWidget(0, 1).node = segmentation
    widget.onTrainButton()
    (request,) = started
    assert request.kind == "synth-train" and request.params["shape"] == [32, 32, 16] and request.params["preset"] == "tiny"
    assert [(pair.volume, pair.segmentation) for pair in request.pairs] == [(volume, segmentation)]
    assert widget.ui.trainButton.text == "Cancel" and widget.ui.generateButton.text == "Generate"
    widget.onTrainButton()
    assert widget.trainPanel._runner.cancelled and len(started) == 1


def test_train_without_pairs_says_what_is_missing_and_starts_nothing(panel):
    widget, started = panel
    with pytest.raises(BadInputError, match="No training pairs"):
        widget.onTrainButton()
    assert started == [] and widget.ui.trainButton.text == "Train"


def test_generate_uses_the_panel_settings_and_exports_when_a_folder_is_set(panel, tmp_path):
    widget, started = panel
    (tmp_path / "model" / "medgen_model.json").parent.mkdir()
    (tmp_path / "model" / "medgen_model.json").write_text(json.dumps({"task": "joint-image-label-ldm"}))
    widget._parameterNode.modelFolder = tmp_path / "model"
    widget._parameterNode.nnunetFolder = tmp_path / "nnUNet_raw"
    widget.onGenerateButton()
    (request,) = started
    assert request.kind == "synthesize" and request.seed == 7
    assert request.input_files == {"model": str(tmp_path / "model")}
    assert request.params == {"count": 3, "batch_size": 2, "steps": 20, "nnunet_dataset_id": 501,
                              "nnunet_name": "MedGenSynthetic", "channel_name": "MRI"}
    assert request.nnunet_folder == tmp_path / "nnUNet_raw"
    assert widget.ui.generateButton.text == "Cancel"


def test_a_finished_training_becomes_the_model_to_generate_from(panel, tmp_path, monkeypatch):
    widget, started = panel
    monkeypatch.setattr(widget.logic, "getParameterNode", lambda: widget._parameterNode)
    widget._parameterNode.trainingSource, widget._parameterNode.trainingFolder = "folder", tmp_path
    widget.onTrainButton()
    assert started[0].input_files == {"folder": str(tmp_path)}
    runner = widget.trainPanel._runner
    runner.returncode, runner.result = 0, {"outputs": {"model": str(tmp_path / "job" / "outputs" / "model")}}
    widget.trainPanel.poll()  # the panel's timer sees the worker exit and imports the result
    assert widget.ui.trainStatusLabel.text.startswith("Done")
    assert widget._parameterNode.modelFolder == tmp_path / "job" / "outputs" / "model"


# ------------------------------------------------------------------------------------------- From masks

MASK_PARAMETERS = dict(
    maskTrainingSource="scene", maskSourceFolder=Path("."), maskTargetFolder=Path("."), sourceModality="CT",
    trainTargetModality="T2 MRI", region="abdomen", maskShapeI=16, maskShapeJ=16, maskShapeK=8, maskPreset="tiny",
    maskEncoding="one-hot", maskPseudoLabels=True, maskMirror=True, maskModelOutputFolder=Path("."), maskSource="scene", maskFolder=Path("."),
    maskModelFolder=Path("."), candidates=6, candidateChunk=3, maskSteps=5, guidanceScale=4.5, conditioningScale=1.5,
    maskSeed=3,
    checkerFolder=Path("."), minAvgConfidence=0.85, minAvgIou=0.75, minOrganIou=0.6, minOrganConfidence=0.7, topK=4,
    maskNnunetFolder=Path("."), maskNnunetDatasetId=502, maskNnunetName="MedGenFromMasks",
)
ORGANS = [LabelInfo("liver", 1, (0.8, 0.4, 0.3)), LabelInfo("spleen", 2, (0.2, 0.3, 0.9))]


class FakeComboBox(types.SimpleNamespace):
    """QComboBox: its items, the first one current."""

    def clear(self):
        self.items = []

    def addItems(self, items):
        self.items = [*getattr(self, "items", []), *items]

    @property
    def currentText(self):
        return self.items[0] if getattr(self, "items", []) else ""


class FakeItemTable(types.SimpleNamespace):
    """QTableWidget filled item by item: the header and the text of every cell."""

    def clear(self):
        self.headers, self.cells = [], {}

    def setColumnCount(self, count):
        self.columns = count

    def setHorizontalHeaderLabels(self, headers):
        self.headers = list(headers)

    def setRowCount(self, count):
        self.rows = count

    def setItem(self, row, column, item):
        self.cells[row, column] = item

    def row(self, row):
        return [self.cells[row, column] for column in range(self.columns)]


@pytest.fixture
def masks_panel(mrml_scene, monkeypatch):
    """The module widget with the From masks section; ``started`` keeps ``(request, startJob keyword arguments)``."""
    parameters = dict(inputVolume=None, device="cpu", outputFolder=Path("."), **MASK_PARAMETERS)
    with fake_module_widget("MedGenSynthesis", monkeypatch, parameters, record=lambda request, kwargs: (request, kwargs)) as (widget, started):
        widget.ui.targetModalityComboBox = FakeComboBox()
        widget.ui.candidateTable = FakeItemTable()
        monkeypatch.setattr(sys.modules["MedGenSynthesis"].qt, "QTableWidgetItem", lambda text: text)
        for name in ("maskSegmentationsComboBox", "maskSourceSegmentationsComboBox", "maskTargetVolumesComboBox"):
            getattr(widget.ui, name).checkedNodes = lambda: []
        widget.setupFromMasks()
        yield widget, started


def _mask_model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    prompts = {modality: {"modality": modality, "organs": [organ.name for organ in ORGANS]} for modality in ("CT", "T2 MRI")}
    document = {"task": "mask-conditioned-ldm", "organs": [dataclasses.asdict(organ) for organ in ORGANS],
                "prompts": prompts, "source_modality": "CT", "target_modality": "T2 MRI"}
    (folder / "medgen_model.json").write_text(json.dumps(document))
    return folder


def _maskgen_outputs(job_dir: Path, report: dict | None) -> Path:
    """What a ``maskgen`` job leaves: one accepted pair of mask ``case`` (candidate 1), ``labels.json``, the report."""
    pairs = job_dir / "outputs" / "pairs"
    pairs.mkdir(parents=True)
    label = torch.zeros(1, 8, 8, 8, dtype=torch.int64)
    label[0, 2:6, 2:6, 2:4], label[0, 2:6, 2:6, 5:7] = 1, 2
    save_volume(MetaTensor(label.float() / 2), pairs / "case_1_image.nii.gz")
    save_volume(MetaTensor(label), pairs / "case_1_label.nii.gz", label=True)
    save_labels(ORGANS, pairs / "labels.json")
    if report is not None:
        (job_dir / "outputs" / "report.json").write_text(json.dumps(report))
    return job_dir / "outputs"


def _candidate(k: int, iou: float, decision: str, reason: str = "") -> dict:
    scores = {"liver": iou, "spleen": iou}
    return {"mask_id": "case", "candidate": k, "organ_iou": scores, "organ_dice": scores, "organ_confidence": scores,
            "absent_organs": [], "avg_iou": iou, "avg_confidence": iou, "avg_dice": iou, "decision": decision, "reason": reason}


REPORT = {"masks": [
    {"mask_id": "case", "status": "accepted", "path": "relaxed",
     "candidates": [_candidate(0, 0.5, "rejected", "fails the relaxed thresholds: average IoU 0.500 < 0.70"),
                    _candidate(1, 0.85, "accepted")], "pairs": [{"image": "case_1_image.nii.gz", "label": "case_1_label.nii.gz"}]},
    {"mask_id": "blank", "status": "skipped: empty mask", "path": None, "candidates": [], "pairs": []},
]}


def _mask_segmentation(scene):
    volume = tensor_to_volume_node(MetaTensor(torch.rand(1, 8, 8, 8)), "case CT", scene=scene)
    label = torch.zeros(1, 8, 8, 8, dtype=torch.int64)
    label[0, 2:5, 2:5, 2:5] = 4
    segmentation = labelmap_to_segmentation(MetaTensor(label), [LabelInfo("Spleen", 4, (1.0, 0.0, 0.0))], "case seg",
                                            scene=scene, reference_node=volume)
    return volume, segmentation


def test_the_model_folder_fills_the_target_modality_choices_and_lists_its_organs(masks_panel, tmp_path):
    widget, _ = masks_panel
    widget.onMaskModelFolderChanged(str(_mask_model(tmp_path / "model")))
    assert widget.ui.targetModalityComboBox.items == ["T2 MRI", "CT"]
    assert widget.ui.maskModelOrgansLabel.text == "liver, spleen"
    widget.onMaskModelFolderChanged(str(tmp_path))
    assert widget.ui.targetModalityComboBox.items == [] and "has no medgen_model.json" in widget.ui.maskModelOrgansLabel.text
    widget.onMaskModelFolderChanged("")
    assert widget.ui.maskModelOrgansLabel.text == "Choose a model folder."


def test_a_model_folder_picked_before_the_dependencies_are_installed_says_so(masks_panel, tmp_path, monkeypatch):
    widget, _ = masks_panel
    widget.onMaskModelFolderChanged(str(_mask_model(tmp_path / "model")))

    def without_torch(folder):
        raise ModuleNotFoundError("No module named 'torch'")

    monkeypatch.setattr(widget.logic, "modelInfo", without_torch)
    widget.onMaskModelFolderChanged(str(tmp_path / "model"))
    assert widget.ui.targetModalityComboBox.items == []  # the previous model's choices are gone
    assert widget.ui.maskModelOrgansLabel.text == "No module named 'torch': press Install dependencies first."


def test_generate_from_masks_sends_the_panel_settings_then_turns_into_cancel(masks_panel, mrml_scene, tmp_path):
    widget, started = masks_panel
    _, segmentation = _mask_segmentation(mrml_scene)
    widget._parameterNode.maskModelFolder = _mask_model(tmp_path / "model")
    widget.onMaskModelFolderChanged(str(widget._parameterNode.maskModelFolder))
    widget.ui.maskSegmentationsComboBox.checkedNodes = lambda: [segmentation]
    widget.onFromMasksButton()
    ((request, kwargs),) = started
    assert request.kind == "maskgen" and request.masks == (segmentation,) and request.seed == 3
    assert request.params == {
        "target_modality": "T2 MRI", "candidates": 6, "chunk": 3, "steps": 5, "guidance_scale": 4.5,
        "conditioning_scale": 1.5, "thresholds": {"avg_confidence": 0.85, "avg_iou": 0.75, "organ_iou": 0.6, "organ_confidence": 0.7, "top_k": 4},
        "nnunet_dataset_id": None,
    }
    assert kwargs["device"] == "cpu"
    assert widget.ui.fromMasksButton.text == "Cancel" and widget.ui.maskTrainButton.text == "Train mask model"
    kwargs["onEvent"]({"event": "progress", "phase": "candidates", "step": 3, "total": 6})
    assert widget.ui.maskProgressLabel.text == "candidates 3/6"
    widget.onFromMasksButton()
    assert widget.fromMasksPanel._runner.cancelled and len(started) == 1


def test_a_finished_generation_loads_the_pairs_and_fills_the_candidate_table(masks_panel, mrml_scene, tmp_path):
    widget, started = masks_panel
    widget._parameterNode.maskModelFolder = _mask_model(tmp_path / "model")
    widget._parameterNode.maskSource, widget._parameterNode.maskFolder = "folder", tmp_path
    save_volume(MetaTensor(torch.zeros(1, 4, 4, 4, dtype=torch.int64)), tmp_path / "case.nii.gz", label=True)
    widget.onFromMasksButton()
    outputs = _maskgen_outputs(tmp_path / "jobs" / "maskgen-1", REPORT)
    runner = widget.fromMasksPanel._runner
    runner.returncode, runner.result = 0, {"outputs": {"pairs": str(outputs / "pairs"), "report": str(outputs / "report.json")}}
    widget.fromMasksPanel.poll()

    assert widget.ui.fromMasksStatusLabel.text.startswith("Done")
    table = widget.ui.candidateTable
    assert table.headers == ["Mask", "Candidate", "Avg IoU", "Avg conf.", "liver IoU / conf.", "spleen IoU / conf.", "Decision"]
    assert table.rows == 3
    assert table.row(1) == ["case", "1", "0.850", "0.850", "0.850 / 0.850", "0.850 / 0.850", "accepted (relaxed)"]
    assert table.row(2)[-1] == "skipped: empty mask"
    assert widget.ui.fromMasksSummaryLabel.text == "1 pair(s) accepted from 2 mask(s); skipped: blank (empty mask)"
    assert mrml_scene.GetFirstNodeByName("case_1 T2 MRI segmentation").GetClassName() == "vtkMRMLSegmentationNode"


def test_a_cancelled_generation_loads_the_pairs_accepted_before_the_cancel(masks_panel, mrml_scene, tmp_path):
    widget, started = masks_panel
    _, segmentation = _mask_segmentation(mrml_scene)
    widget._parameterNode.maskModelFolder = _mask_model(tmp_path / "model")
    widget.ui.maskSegmentationsComboBox.checkedNodes = lambda: [segmentation]
    widget.onFromMasksButton()
    ((_, kwargs),) = started
    job_dir = tmp_path / "jobs" / "maskgen-2"
    kwargs["onEvent"]({"event": "started", "job_dir": str(job_dir)})
    _maskgen_outputs(job_dir, None)  # the first mask's pair was accepted, then the user cancelled
    widget.onFromMasksButton()
    kwargs["onEvent"]({"event": "error", "kind": "cancelled", "message": "Cancelled."})
    runner = widget.fromMasksPanel._runner
    runner.returncode = 3
    widget.fromMasksPanel.poll()

    assert widget.ui.fromMasksStatusLabel.text == "Cancelled." and widget.ui.fromMasksButton.text == "Generate from masks"
    assert widget.ui.fromMasksSummaryLabel.text == "1 pair(s) accepted"
    volume = mrml_scene.GetFirstNodeByName("case_1 T2 MRI")
    assert volume is not None and list(volume.GetImageData().GetDimensions()) == [8, 8, 8]


def test_train_mask_model_pairs_each_segmentation_with_its_reference_volume(masks_panel, mrml_scene, tmp_path):
    widget, started = masks_panel
    volume, segmentation = _mask_segmentation(mrml_scene)
    target = tensor_to_volume_node(MetaTensor(torch.rand(1, 8, 8, 8)), "case T2", scene=mrml_scene)
    widget.ui.maskSourceSegmentationsComboBox.checkedNodes = lambda: [segmentation]
    widget.ui.maskTargetVolumesComboBox.checkedNodes = lambda: [target]
    widget.onMaskTrainButton()
    ((request, _),) = started
    assert request.kind == "maskgen-train" and request.target_volumes == (target,)
    assert [(pair.volume, pair.segmentation) for pair in request.pairs] == [(volume, segmentation)]
    assert request.params["shape"] == [16, 16, 8] and request.params["source_modality"] == "CT"
    assert request.params["target_pseudo_labels"] is True
    assert request.params["controlnet_flip_axes"] == request.params["unet_flip_axes"] == [0, 1, 2]
    assert widget.ui.maskTrainButton.text == "Cancel"
    runner = widget.maskTrainPanel._runner
    runner.returncode, runner.result = 0, {"outputs": {"model": str(tmp_path / "job" / "outputs" / "model")}}
    widget.maskTrainPanel.poll()
    assert widget._parameterNode.maskModelFolder == tmp_path / "job" / "outputs" / "model"


def test_train_mask_model_without_target_data_says_what_is_missing(masks_panel, mrml_scene):
    widget, started = masks_panel
    _, segmentation = _mask_segmentation(mrml_scene)
    widget.ui.maskSourceSegmentationsComboBox.checkedNodes = lambda: [segmentation]
    with pytest.raises(BadInputError, match="No target-modality data"):
        widget.onMaskTrainButton()
    assert started == [] and widget.ui.maskTrainButton.text == "Train mask model"


def test_generate_exports_under_the_dataset_name_typed_in_the_panel(panel, tmp_path):
    widget, started = panel
    (tmp_path / "model" / "medgen_model.json").parent.mkdir()
    (tmp_path / "model" / "medgen_model.json").write_text(json.dumps({"task": "joint-image-label-ldm"}))
    widget._parameterNode.modelFolder, widget._parameterNode.nnunetFolder = tmp_path / "model", tmp_path / "nnUNet_raw"
    widget._parameterNode.nnunetName, widget._parameterNode.nnunetDatasetId = "Brains", 7
    widget.onGenerateButton()
    (request,) = started
    assert (request.params["nnunet_name"], request.params["nnunet_dataset_id"]) == ("Brains", 7)
