"""TenVOO Fine-Tune panel: the pair table, Preview, Train/Segment/Compare turning into Cancel, with Qt widgets faked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import slicer
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
        inputVolume=None, device="cpu", outputFolder=Path("."), modelSource="deepbet", modelFolder=Path("."),
        method="tenvoo-q", rank=3, steps=25, learningRate=5e-4, validationVolume=None, validationSegmentation=None,
        adapterOutputFolder=Path("."), adapterFolder=Path("."), segmentVolume=None, compareVolume=None,
        compareSegmentation=None,
    )
    with fake_module_widget("TenVOOSlicer", monkeypatch, parameters, record=lambda request, kwargs: (request, kwargs)) as (widget, started):
        widget.setupFineTuning()
        yield widget, started

def _pair_nodes(scene, segment_name="brain"):
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "case MR")
    label = torch.zeros(1, 8, 8, 8, dtype=torch.int64)
    label[0, 2:5, 2:5, 2:5] = 1
    labels = [LabelInfo(segment_name, 1, (1.0, 0.0, 0.0))]
    segmentation = labelmap_to_segmentation(MetaTensor(label), labels, "case seg", scene=scene)
    return volume, segmentation


def test_train_starts_on_the_table_pairs_with_the_panel_settings_then_cancels(panel, mrml_scene):
    widget, started = panel
    volume, segmentation = _pair_nodes(mrml_scene)
    widget.onAddPairButton()
    widget.onAddPairButton()
    table = widget.ui.trainingPairsTable
    assert [table.cellWidget(0, column).nodeTypes for column in (0, 1)] == [["vtkMRMLScalarVolumeNode"], ["vtkMRMLSegmentationNode"]]
    table.selected = 1
    widget.onRemovePairButton()
    table.cellWidget(0, 0).node, table.cellWidget(0, 1).node = volume, segmentation
    widget.onTrainButton()
    ((request, kwargs),) = started
    assert request.kind == "finetune" and request.input_files == {}  # deepbet is built in
    assert request.params == {"method": "tenvoo-q", "method_options": {"rank": 3}, "steps": 25, "lr": 5e-4}
    assert [(pair.volume, pair.segmentation) for pair in request.pairs] == [(volume, segmentation)]
    assert request.validation is None and request.class_names == ("brain",) and request.adapter_folder is None
    assert widget.ui.trainButton.text == "Cancel" and widget.ui.segmentButton.text == "Segment"
    kwargs["onEvent"]({"event": "progress", "phase": "training", "step": 4, "total": 25, "loss": 0.5})
    kwargs["onEvent"]({"event": "log", "message": "step 4: validation Dice 0.7500"})
    assert widget.ui.lossLabel.text == "step 4: loss 0.5 | validation Dice 0.7500"
    assert widget.ui.trainStatusLabel.text.startswith("training 4/25")
    widget.onTrainButton()
    assert widget.trainPanel._runner.cancelled and len(started) == 1


def test_a_segment_that_is_no_model_class_is_refused_and_nothing_starts(panel, mrml_scene):
    widget, started = panel
    volume, segmentation = _pair_nodes(mrml_scene)
    segmentation.GetSegmentation().AddEmptySegment("skull", "skull")
    widget.onAddPairButton()
    widget.ui.trainingPairsTable.cellWidget(0, 0).node = volume
    widget.ui.trainingPairsTable.cellWidget(0, 1).node = segmentation
    with pytest.raises(BadInputError, match="Segment 'skull' of segmentation 'case seg' is not a class of the model"):
        widget.onTrainButton()
    assert started == [] and widget.ui.trainButton.text == "Train"


def test_a_finished_training_becomes_the_adapter_to_segment_and_compare_with(panel, mrml_scene, tmp_path):
    widget, started = panel
    volume, segmentation = _pair_nodes(mrml_scene, segment_name="anything")  # one segment -> deepbet's class
    widget.onAddPairButton()
    widget.ui.trainingPairsTable.cellWidget(0, 0).node = volume
    widget.ui.trainingPairsTable.cellWidget(0, 1).node = segmentation
    adapter = tmp_path / "saved adapter"
    widget._parameterNode.adapterOutputFolder = adapter
    widget.onTrainButton()
    runner = widget.trainPanel._runner
    trained = tmp_path / "job" / "outputs" / "adapter"
    trained.mkdir(parents=True)
    (trained / "adapter.safetensors").write_bytes(b"weights")
    runner.returncode, runner.result = 0, {"outputs": {"adapter": str(trained), "report": str(tmp_path / "report.json")}}
    widget.trainPanel.poll()  # the panel's timer sees the worker exit and imports the result
    assert widget.ui.trainStatusLabel.text.startswith("Done")
    assert widget._parameterNode.adapterFolder == adapter and (adapter / "adapter.safetensors").read_bytes() == b"weights"

    widget._parameterNode.segmentVolume = volume
    widget.onSegmentButton()
    request = started[-1][0]
    assert request.kind == "infer" and request.input_nodes == {"image": volume}
    assert request.input_files == {"adapter": str(adapter)}
    assert request.imports[0].node_name == "case MR adapted segmentation"

    widget._parameterNode.compareVolume, widget._parameterNode.compareSegmentation = volume, segmentation
    widget.onCompareButton()
    request, kwargs = started[-1]
    assert request.kind == "evaluate" and request.pair.segmentation is segmentation
    runner = widget.comparePanel._runner
    runner.returncode, runner.result = 0, {"outputs": {"report": str(tmp_path / "evaluation.json")}, "classes": ["brain"],
                                           "base_dice": [0.5], "adapted_dice": [0.875]}
    widget.comparePanel.poll()
    assert widget.ui.diceLabel.text == "brain: base 0.500 -> adapted 0.875"


def test_a_model_folder_is_required_when_chosen(panel):
    widget, started = panel
    widget._parameterNode.modelSource = "folder"
    volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "case MR")
    widget._parameterNode.segmentVolume = volume
    with pytest.raises(BadInputError, match="Choose the model folder"):
        widget.onSegmentButton()
    assert started == [] and widget.ui.segmentButton.text == "Segment"


def test_preview_shows_the_parameter_count(panel, monkeypatch):
    widget, _ = panel
    counted = []
    monkeypatch.setattr(widget.logic, "previewParameterCount",
                        lambda parameters: counted.append(parameters) or (1234, 5678901))
    widget.onPreviewButton()
    assert counted == [widget._parameterNode]
    assert widget.ui.parameterCountLabel.text == "Trainable parameters: 1,234 of 5,678,901 (0.0217 %)"
