"""TenVOO Fine-Tune panel: the pair table, Preview, Train/Segment/Compare turning into Cancel, with Qt widgets faked."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import slicer
import torch
from monai.data import MetaTensor

from medgen.errors import BadInputError
from medgen.labels import LabelInfo
from medgen.slicer.segmentations import labelmap_to_segmentation
from medgen.slicer.volumes import tensor_to_volume_node

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
    shown_charts = []
    plots_logic = types.SimpleNamespace(ShowChartInLayout=shown_charts.append)
    monkeypatch.setattr(slicer.modules, "plots", types.SimpleNamespace(logic=lambda: plots_logic), raising=False)
    with fake_module_widget("TenVOOSlicer", monkeypatch, parameters, record=lambda request, kwargs: (request, kwargs)) as (widget, started):
        widget.setupFineTuning()
        widget.shown_charts = shown_charts
        yield widget, started


def _pair_nodes(scene, segment_name="brain"):
    volume = tensor_to_volume_node(MetaTensor(torch.rand(1, 8, 8, 8)), "case MR", scene=scene)
    label = torch.zeros(1, 8, 8, 8, dtype=torch.int64)
    label[0, 2:5, 2:5, 2:5] = 1
    labels = [LabelInfo(segment_name, 1, (1.0, 0.0, 0.0))]
    segmentation = labelmap_to_segmentation(MetaTensor(label), labels, "case seg", scene=scene)
    return volume, segmentation


def _add_pair_row(widget, volume, segmentation):
    """What the user does in the training-pairs table: add a row and pick its two nodes."""
    widget.onAddPairButton()
    widget.ui.trainingPairsTable.cellWidget(0, 0).node = volume
    widget.ui.trainingPairsTable.cellWidget(0, 1).node = segmentation


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


def test_training_draws_its_loss_in_one_reused_chart_shown_in_the_layout(panel, mrml_scene):
    widget, started = panel
    volume, segmentation = _pair_nodes(mrml_scene)
    _add_pair_row(widget, volume, segmentation)
    for run, losses in enumerate(([0.9, 0.6, 0.4], [0.8, 0.7])):
        widget.onTrainButton()
        runner = widget.trainPanel._runner
        for step, loss in enumerate(losses, start=1):
            # the worker's events reach the panel through the runner, as JobRunner.poll delivers them
            started[-1][1]["onEvent"]({"event": "progress", "phase": "training", "step": step, "total": 3, "loss": loss})
        runner.returncode, runner.result = 1, None
        widget.trainPanel.poll()
        assert widget.logic.lossPlot.points() == ([float(step) for step in range(1, len(losses) + 1)], losses)
    chart = widget.logic.lossPlot.chart_node
    assert widget.shown_charts == [chart, chart]
    assert chart.GetName() == "TenVOO training loss" and mrml_scene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode") == 1


def test_a_segment_that_is_no_model_class_is_refused_and_nothing_starts(panel, mrml_scene):
    widget, started = panel
    volume, segmentation = _pair_nodes(mrml_scene)
    segmentation.GetSegmentation().AddEmptySegment("skull", "skull")
    _add_pair_row(widget, volume, segmentation)
    with pytest.raises(BadInputError, match="Segment 'skull' of segmentation 'case seg' is not a class of the model"):
        widget.onTrainButton()
    assert started == [] and widget.ui.trainButton.text == "Train"


def test_a_finished_training_becomes_the_adapter_to_segment_and_compare_with(panel, mrml_scene, tmp_path):
    widget, started = panel
    volume, segmentation = _pair_nodes(mrml_scene, segment_name="anything")  # one segment -> deepbet's class
    _add_pair_row(widget, volume, segmentation)
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
    volume = tensor_to_volume_node(MetaTensor(torch.rand(1, 8, 8, 8)), "case MR", scene=slicer.mrmlScene)
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


def _choose_folder(folder):
    """The folder the (faked) Qt folder dialog returns; "" is the user pressing Cancel."""
    sys.modules["qt"].QFileDialog.getExistingDirectory.return_value = str(folder)


def test_save_adapter_copies_the_adapter_in_use_to_the_chosen_folder_once(panel, tmp_path):
    widget, _ = panel
    trained = tmp_path / "job" / "outputs" / "adapter"
    trained.mkdir(parents=True)
    (trained / "adapter_config.json").write_text("{}")
    (trained / "adapter_model.safetensors").write_bytes(b"weights")
    widget._parameterNode.adapterFolder = trained
    _choose_folder("")
    widget.onSaveAdapterButton()
    assert widget._parameterNode.adapterFolder == trained
    _choose_folder(tmp_path / "kept")
    widget.onSaveAdapterButton()
    assert (tmp_path / "kept" / "adapter_model.safetensors").read_bytes() == b"weights"
    assert widget._parameterNode.adapterFolder == tmp_path / "kept"
    assert widget.ui.adapterStatusLabel.text.startswith(f"Saved to {tmp_path / 'kept'}")
    with pytest.raises(BadInputError, match="kept already exists and is not empty"):
        widget.onSaveAdapterButton()
    widget._parameterNode.adapterFolder = Path(".")
    with pytest.raises(BadInputError, match="no adapter to save yet: train one first"):
        widget.logic.saveAdapter(tmp_path / "elsewhere", widget._parameterNode)


def test_load_adapter_refuses_an_adapter_of_another_base_model(panel, tmp_path):
    from monai.networks.nets import UNet

    from medgen.models.segmentation import load_segmentation_model
    from medgen.errors import ModelError
    from medgen.models import save_model
    from medgen.peft import inject, save_adapter
    from medgen_testing import TINY_UNET_KWARGS, tiny_unet_spec

    for seed in (0, 1):
        torch.manual_seed(seed)
        save_model(UNet(**TINY_UNET_KWARGS), tiny_unet_spec(), tmp_path / f"model {seed}")
    network = load_segmentation_model(str(tmp_path / "model 0")).network
    save_adapter(inject(network, "bitfit"), tmp_path / "adapter")
    widget, _ = panel
    widget._parameterNode.modelSource, widget._parameterNode.modelFolder = "folder", tmp_path / "model 1"
    _choose_folder(tmp_path / "adapter")
    with pytest.raises(ModelError, match=r"does not fit the selected model \(.*model 1\).*SHA-256"):
        widget.onLoadAdapterButton()
    assert widget._parameterNode.adapterFolder == Path(".")
    widget._parameterNode.modelFolder = tmp_path / "model 0"
    widget.onLoadAdapterButton()
    assert widget._parameterNode.adapterFolder == tmp_path / "adapter"
    assert widget.ui.adapterStatusLabel.text.startswith("Loaded bitfit adapter, ")
    assert "trained parameters from" in widget.ui.adapterStatusLabel.text


def test_pair_rows_offer_only_plain_nodes_and_remove_drops_the_last_row_when_none_is_selected(panel):
    widget, _ = panel
    widget.onAddPairButton()
    widget.onAddPairButton()
    table = widget.ui.trainingPairsTable
    first = table.cellWidget(0, 0)
    assert [(s.showChildNodeTypes, s.noneEnabled, s.addEnabled, s.removeEnabled)
            for s in (table.cellWidget(0, 0), table.cellWidget(0, 1))] == [(False, True, False, False)] * 2
    table.selected = -1
    widget.onRemovePairButton()
    assert table.rowCount == 1 and table.cellWidget(0, 0) is first


def test_a_validation_volume_without_its_segmentation_is_refused_not_ignored(panel, mrml_scene):
    widget, started = panel
    volume, segmentation = _pair_nodes(mrml_scene)
    held_out, _ = _pair_nodes(mrml_scene)
    _add_pair_row(widget, volume, segmentation)
    widget._parameterNode.validationVolume = held_out
    with pytest.raises(BadInputError, match="The validation pair lacks its volume or its segmentation"):
        widget.onTrainButton()
    assert started == []
