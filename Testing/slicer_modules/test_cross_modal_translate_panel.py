"""Cross-Modal Translation panel: Translate/Train turning into Cancel, the remembered model folder and the
Segment Editor button, with Qt widgets faked (a real Logic and real MRML; jobs are recorded, not run)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import slicer
import torch
from monai.data import MetaTensor

from medgen_testing import oblique_affine
from medgen.errors import BadInputError
from medgen.io import save_volume
from medgen.slicer.volumes import ijk_to_ras_of, tensor_to_volume_node

REPOSITORY = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPOSITORY / "Testing" / "packaging"))
from slicer_stubs import fake_module_widget  # noqa: E402

SETTING = "CrossModalTranslate/ModelFolder"


class FakeSettings:
    """qt.QSettings over a dict that outlives the widget (as the application's settings file does)."""

    def __init__(self, store: dict):
        self.store = store

    def value(self, key, default=None):
        return self.store.get(key, default)

    def setValue(self, key, value):
        self.store[key] = value


@pytest.fixture
def settings():
    return {}


@pytest.fixture
def panel(mrml_scene, monkeypatch, settings):
    """The module widget on fake widgets (every name in the .ui), a real Logic whose jobs are recorded."""
    parameters = dict(
        inputVolume=None, device="cpu", outputFolder=Path("."), sourceVolume=None, sourceModality="T2",
        modelFolder=Path("."), sampler="ddim", samplingSteps=25, seed=4, memoryBudgetMb=0.0, translatedVolume=None,
        trainingSource="scene", trainingFolder=Path("."), targetModality="T1", mode="2.5d", preset="tiny",
        gridI=32, gridJ=32, gridK=16, trainingSteps=150, modelOutputFolder=Path("."),
    )
    with fake_module_widget("CrossModalTranslate", monkeypatch, parameters,
                            record=lambda request, kwargs: (request, kwargs)) as (widget, started):
        sys.modules["qt"].QSettings.side_effect = lambda: FakeSettings(settings)
        widget.setupTranslation()
        yield widget, started


def _model_folder(folder: Path, target_modality: str = "T1") -> Path:
    """A folder that passes the model check (the weights are never loaded: no job runs here)."""
    folder.mkdir(parents=True)
    config = {"mode": "2.5d", "grid": [32, 32, 16], "conditioned": True}
    document = {"format_version": 1, "task": "lmi-translation", "config": config, "training_volumes": 3,
                "target_modality": target_modality}
    (folder / "medgen_model.json").write_text(json.dumps(document))
    (folder / "unet.safetensors").write_bytes(b"")
    return folder


def _volume(scene, name: str):
    image = torch.rand(1, 12, 10, 8, generator=torch.Generator().manual_seed(0))
    return tensor_to_volume_node(MetaTensor(image, affine=torch.from_numpy(oblique_affine())), name, scene=scene)


def test_translate_starts_with_the_panel_settings_then_cancels(panel, mrml_scene, tmp_path):
    widget, started = panel
    widget._parameterNode.sourceVolume = _volume(mrml_scene, "case 3")
    widget._parameterNode.modelFolder = _model_folder(tmp_path / "model")
    widget._parameterNode.memoryBudgetMb = 256.0
    widget.onTranslateButton()
    ((request, kwargs),) = started
    assert (request.kind, request.seed, request.input_files) == ("translate", 4, {"model": str(tmp_path / "model")})
    assert request.params == {"sampler": "ddim", "steps": 25, "memory_budget_mb": 256.0}
    assert request.imports[0].node_name == "case 3 (T2→T1)"
    assert kwargs["device"] == "cpu"
    assert widget.ui.translateButton.text == "Cancel" and widget.ui.trainButton.text == "Train"
    assert not widget.ui.checkSetupButton.enabled
    kwargs["onEvent"]({"event": "progress", "phase": "translating", "step": 5, "total": 25, "eta_s": 40})
    assert widget.ui.translateStatusLabel.text == "translating 5/25 | ETA 40s | device cpu"
    widget.onTranslateButton()
    assert widget.translatePanel._runner.cancelled and len(started) == 1


def test_translate_without_a_model_says_what_is_missing_and_starts_nothing(panel, mrml_scene):
    widget, started = panel
    widget._parameterNode.sourceVolume = _volume(mrml_scene, "case 3")
    with pytest.raises(BadInputError, match="Choose the translation model folder"):
        widget.onTranslateButton()
    assert started == [] and widget.ui.translateButton.text == "Translate"


def test_segment_editor_button_is_enabled_only_once_an_output_exists(panel, mrml_scene, tmp_path, monkeypatch):
    widget, _ = panel
    source = _volume(mrml_scene, "case 3")
    widget._parameterNode.sourceVolume, widget._parameterNode.modelFolder = source, _model_folder(tmp_path / "model")
    widget.updateSegmentEditorButton()
    assert not widget.ui.segmentEditorButton.enabled
    widget.onTranslateButton()
    runner = widget.translatePanel._runner
    output_file = save_volume(MetaTensor(torch.rand(1, 12, 10, 8), affine=torch.from_numpy(oblique_affine())), tmp_path / "t.nii.gz")
    runner.returncode, runner.result = 0, {"outputs": {"translated": str(output_file)}}
    widget.translatePanel.poll()  # the panel's timer sees the worker exit and imports the output
    output = widget._parameterNode.translatedVolume
    assert output.GetName() == "case 3 (T2→T1)" and widget.ui.translateStatusLabel.text.startswith("Done")
    np.testing.assert_array_equal(ijk_to_ras_of(output), ijk_to_ras_of(source))
    assert widget.ui.segmentEditorButton.enabled

    selected, editor = [], types.SimpleNamespace()
    editor.setSegmentationNode = lambda node: setattr(editor, "segmentation", node)
    editor.setSourceVolumeNode = lambda node: setattr(editor, "source", node)
    module_widget = types.SimpleNamespace(self=lambda: types.SimpleNamespace(editor=editor))
    monkeypatch.setattr(slicer.util, "selectModule", selected.append)
    monkeypatch.setattr(slicer.modules, "segmenteditor", types.SimpleNamespace(widgetRepresentation=lambda: module_widget), raising=False)
    widget.onSegmentEditorButton()
    assert selected == ["SegmentEditor"] and editor.source is output
    assert editor.segmentation.GetNodeReference(editor.segmentation.GetReferenceImageGeometryReferenceRole()) is output

    widget.ui.translatedVolumeSelector.slots["currentNodeChanged(vtkMRMLNode*)"](None)  # the output was deleted
    assert not widget.ui.segmentEditorButton.enabled


def test_a_valid_model_folder_is_described_and_remembered_for_the_next_session(panel, tmp_path, settings):
    widget, _ = panel
    widget._parameterNode.modelFolder = tmp_path / "not a model"
    (tmp_path / "not a model").mkdir()
    widget.onModelFolderChanged()
    assert "has no medgen_model.json" in widget.ui.modelInfoLabel.text and settings == {}
    widget._parameterNode.modelFolder = _model_folder(tmp_path / "model")
    widget.onModelFolderChanged()
    assert widget.ui.modelInfoLabel.text == "T1 model: 2.5d, 32x32x16 grid, trained on 3 volume(s)"
    assert settings == {SETTING: str(tmp_path / "model")}
    widget._parameterNode.modelFolder = Path(".")  # a new scene: nothing chosen yet
    widget.restoreModelFolder()
    assert widget._parameterNode.modelFolder == tmp_path / "model"

    # the directory button's signal carries the new folder before the parameter node is updated from it
    other = _model_folder(tmp_path / "other model")
    widget.ui.modelFolderButton.slots["directoryChanged(QString)"](str(other))
    assert settings == {SETTING: str(other)}


def test_train_uses_the_checked_volumes_and_its_model_becomes_the_one_to_translate_with(panel, mrml_scene, tmp_path, settings):
    widget, started = panel
    volumes = [_volume(mrml_scene, "T1 a"), _volume(mrml_scene, "T1 b")]
    widget.ui.trainingVolumesSelector.checkedNodes = lambda: volumes
    widget.onTrainButton()
    ((request, _),) = started
    assert request.kind == "translate-train" and list(request.volumes) == volumes and request.model_folder is None
    assert request.params == {"target_modality": "T1", "grid": [32, 32, 16], "mode": "2.5d", "preset": "tiny", "steps": 150}
    assert widget.ui.trainButton.text == "Cancel" and widget.ui.translateButton.text == "Translate"
    runner = widget.trainPanel._runner
    runner.returncode, runner.result = 0, {"outputs": {"model": str(_model_folder(tmp_path / "job" / "outputs" / "model"))}}
    widget.trainPanel.poll()
    assert widget._parameterNode.modelFolder == tmp_path / "job" / "outputs" / "model"
    assert widget.ui.modelInfoLabel.text.startswith("T1 model")
    assert settings == {SETTING: str(tmp_path / "job" / "outputs" / "model")}


def test_train_from_a_folder_needs_the_folder(panel, tmp_path):
    widget, started = panel
    widget.ui.trainingVolumesSelector.checkedNodes = lambda: []
    widget._parameterNode.trainingSource = "folder"
    with pytest.raises(BadInputError, match="Choose the training folder"):
        widget.onTrainButton()
    save_volume(MetaTensor(torch.rand(1, 8, 8, 8), affine=torch.eye(4)), tmp_path / "t1.nii.gz")
    widget._parameterNode.trainingFolder = tmp_path
    widget.onTrainButton()
    ((request, _),) = started
    assert request.input_files == {"volumes": [str(tmp_path / "t1.nii.gz")]}


def test_a_scene_model_choice_wins_over_the_remembered_one_and_each_grid_size_reaches_the_job(panel, mrml_scene, tmp_path, settings):
    widget, started = panel
    settings[SETTING] = str(_model_folder(tmp_path / "remembered"))
    widget._parameterNode.modelFolder = chosen = _model_folder(tmp_path / "chosen")
    widget.restoreModelFolder()
    assert widget._parameterNode.modelFolder == chosen
    widget._parameterNode.gridI, widget._parameterNode.gridJ, widget._parameterNode.gridK = 40, 24, 16
    widget.ui.trainingVolumesSelector.checkedNodes = lambda: [_volume(mrml_scene, "T1 a")]
    widget.onTrainButton()
    ((request, _),) = started
    assert request.params["grid"] == [40, 24, 16]


def test_jobs_ending_after_the_user_left_the_module_are_imported_and_adopted(panel, mrml_scene, tmp_path, settings,
                                                                              monkeypatch):
    """Leaving the module drops the widget's parameter node while the job runs on; its end must still adopt the
    new model (remembered) and the new output, through the Logic's node, instead of failing after the import."""
    widget, _ = panel
    node = widget._parameterNode
    monkeypatch.setattr(widget.logic, "getParameterNode", lambda: node)  # the scene's node outlives the widget's link
    widget.ui.trainingVolumesSelector.checkedNodes = lambda: [_volume(mrml_scene, "T1 a")]
    widget.onTrainButton()
    widget._parameterNode = None  # what exit() does
    model = _model_folder(tmp_path / "job" / "outputs" / "model")
    widget.trainPanel._runner.returncode, widget.trainPanel._runner.result = 0, {"outputs": {"model": str(model)}}
    widget.trainPanel.poll()
    assert widget.ui.trainStatusLabel.text.startswith("Done") and node.modelFolder == model
    assert settings == {SETTING: str(model)}
    widget._parameterNode = node  # back in the module: translate, then leave again before it ends
    node.sourceVolume = _volume(mrml_scene, "case 3")
    widget.onTranslateButton()
    widget._parameterNode = None
    output = save_volume(MetaTensor(torch.rand(1, 12, 10, 8), affine=torch.from_numpy(oblique_affine())), tmp_path / "t.nii.gz")
    widget.translatePanel._runner.returncode, widget.translatePanel._runner.result = 0, {"outputs": {"translated": str(output)}}
    widget.translatePanel.poll()
    assert widget.ui.translateStatusLabel.text.startswith("Done") and node.translatedVolume is not None


def test_a_model_output_folder_that_would_hold_the_job_folders_is_refused_before_training(panel, mrml_scene, tmp_path):
    widget, started = panel
    node = widget._parameterNode
    node.outputFolder = node.modelOutputFolder = tmp_path  # the job writes its folders there: never empty at the end
    with pytest.raises(BadInputError, match="would hold the job folders"):
        widget.logic.panelTrainRequest(node, [_volume(mrml_scene, "T1 a")])
    node.modelOutputFolder = tmp_path / "model"  # inside the output folder is fine
    assert widget.logic.panelTrainRequest(node, [_volume(mrml_scene, "T1 b")]).model_folder == tmp_path / "model"
