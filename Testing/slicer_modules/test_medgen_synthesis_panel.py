"""Synthetic Data panel: the pair table, and Train/Generate turning into Cancel, with Qt widgets faked."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from monai.data import MetaTensor

from medgen.errors import BadInputError
from medgen.labels import LabelInfo
from medgen.slicer.segmentations import labelmap_to_segmentation

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
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "case MR")
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
