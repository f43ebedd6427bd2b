"""A module panel's buttons drive the logic and the job panel as the user would expect."""

from __future__ import annotations

import types
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
import slicer

from slicer_stubs import MODULE_NAMES, FakeRunner, FakeWidget, fake_app, fake_ui, slicer_gui_stubs


class RecordingLogic:
    """Stands in for the module Logic: records the jobs the panel asks for."""

    def __init__(self, module_logic):
        self.module_logic, self.started = module_logic, []

    def applyJobRequest(self, parameterNode):
        return self.module_logic.applyJobRequest(parameterNode)

    def startJob(self, request, jobRoot=None, device="auto", onEvent=None):
        self.started.append({"request": request, "jobRoot": jobRoot, "device": device, "onEvent": onEvent})
        return FakeRunner()


@pytest.fixture(params=MODULE_NAMES)
def panel(request, mrml_scene, monkeypatch):
    """A module widget wired to fake Qt widgets, a recording logic and a real volume node."""
    module_name = request.param
    # tryWithErrorDisplay asks the application for a wait cursor and whether tests run.
    app = types.SimpleNamespace(setOverrideCursor=lambda cursor: None, restoreOverrideCursor=lambda: None,
                                testingEnabled=lambda: True)
    monkeypatch.setattr(slicer, "app", app, raising=False)
    with slicer_gui_stubs():
        module_file = __import__(module_name)
        widget = getattr(module_file, f"{module_name}Widget")()
        widget.ui = types.SimpleNamespace(**{name: FakeWidget(text="", enabled=True, toolTip="") for name in (
            "applyButton", "progressBar", "statusLabel", "checkSetupButton", "installDependenciesButton",
            "setupStatusLabel")})
        widget.ui.applyButton.text = "Apply"
        widget.logic = RecordingLogic(getattr(module_file, f"{module_name}Logic")())
        volume = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "patient T1")
        widget._parameterNode = types.SimpleNamespace(inputVolume=volume, device="cpu", outputFolder=Path("."))
        widget.setupJobControls()
        widget._checkCanApply()
        yield widget, __import__("medgen.slicerqt.module_widget", fromlist=["*"])


def test_buttons_are_connected(panel):
    widget, _ = panel
    assert widget.ui.applyButton.slots["clicked(bool)"] == widget.onApplyButton
    assert widget.ui.checkSetupButton.slots["clicked(bool)"] == widget.onCheckSetupButton
    assert widget.ui.installDependenciesButton.slots["clicked(bool)"] == widget.onInstallDependenciesButton


def test_apply_starts_the_job_then_cancels_it(panel):
    widget, _ = panel
    assert widget.ui.applyButton.enabled
    widget.onApplyButton()
    (started,) = widget.logic.started
    assert started["device"] == "cpu" and started["jobRoot"] is None  # no folder chosen: Slicer's temp folder
    started["onEvent"]({"event": "progress", "phase": "selftest", "step": 1, "total": 3})  # worker events reach the panel
    assert widget.ui.statusLabel.text.startswith("selftest 1/3")
    assert widget.ui.applyButton.text == "Cancel" and not widget.ui.checkSetupButton.enabled
    widget.onApplyButton()
    assert widget.jobPanel._runner.cancelled
    assert len(widget.logic.started) == 1


def test_apply_is_disabled_without_an_input_volume(panel):
    widget, _ = panel
    widget._parameterNode.inputVolume = None
    widget._checkCanApply()
    assert not widget.ui.applyButton.enabled


def test_check_setup_reports_torch_and_runs_the_selftest(panel):
    widget, _ = panel
    widget._parameterNode.outputFolder = Path("/data/jobs")
    widget.onCheckSetupButton()
    assert widget.ui.setupStatusLabel.text.startswith("PyTorch ")
    (started,) = widget.logic.started
    assert started["request"].kind == "selftest" and started["jobRoot"] == "/data/jobs"
    assert started["request"].imports[0].node_name == f"patient T1 {widget.moduleName} selftest"


def test_check_setup_without_a_volume_explains_what_is_missing(panel):
    widget, _ = panel
    widget._parameterNode.inputVolume = None
    widget.onCheckSetupButton()
    assert widget.logic.started == []
    assert "Select an input volume" in widget.ui.statusLabel.text


def test_install_dependencies_uses_the_module_requirements(panel, monkeypatch):
    widget, module_widget = panel
    requested = []
    monkeypatch.setattr(module_widget, "ensure_dependencies",
                        lambda path, requester: requested.append((Path(path), requester)) or True)
    widget.onInstallDependenciesButton()
    ((path, requester),) = requested
    assert path.name == f"{widget.moduleName}-requirements.txt" and path.is_file()
    assert requester == widget.moduleName
    assert widget.ui.setupStatusLabel.text.endswith("restart Slicer to use the updated packages")


def test_check_setup_without_torch_points_to_the_install_button(panel, monkeypatch):
    widget, module_widget = panel
    monkeypatch.setattr(module_widget, "torch_report", lambda: {"installed": False})
    widget.onCheckSetupButton()
    assert widget.logic.started == []
    assert "Install dependencies" in widget.ui.setupStatusLabel.text


@pytest.mark.parametrize("module_name", MODULE_NAMES)
def test_setup_loads_the_ui_wires_every_button_and_follows_the_scene(module_name, mrml_scene, monkeypatch):
    """The whole of ``setup()`` as Slicer calls it, on fake widgets named after the module's .ui: only the
    parameter node's GUI binding (Qt properties) is left out."""
    monkeypatch.setattr(slicer, "app", fake_app(), raising=False)
    with slicer_gui_stubs():
        module_file = __import__(module_name)
        top, ui, loaded, added, scenes, initialized = FakeWidget(), fake_ui(module_name), [], [], [], []
        top.setMRMLScene = scenes.append
        monkeypatch.setattr(slicer.util, "loadUI", lambda path: loaded.append(path) or top)
        monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda uiWidget: ui if uiWidget is top else None)
        widget = getattr(module_file, f"{module_name}Widget")()
        widget.layout = FakeWidget(addWidget=added.append)
        monkeypatch.setattr(widget, "initializeParameterNode", lambda: initialized.append(True))
        widget.setup()
        try:
            assert loaded == [widget.resourcePath(f"UI/{module_name}.ui")] and Path(loaded[0]).is_file()
            assert added == [top] and scenes == [slicer.mrmlScene] and widget.ui is ui
            assert type(widget.logic) is getattr(module_file, f"{module_name}Logic")
            assert widget.ui.applyButton.slots["clicked(bool)"] == widget.onApplyButton
            push_buttons = _widget_names(module_name, "QPushButton")
            assert len(push_buttons) > 3
            assert [name for name in push_buttons if not getattr(getattr(ui, name), "slots", None)] == []
            for event, handler in ((slicer.mrmlScene.StartCloseEvent, widget.onSceneStartClose),
                                   (slicer.mrmlScene.EndCloseEvent, widget.onSceneEndClose)):
                assert widget.hasObserver(slicer.mrmlScene, event, handler)
            assert initialized == [True]
        finally:
            widget.cleanup()
        assert not widget.hasObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, widget.onSceneStartClose)


def _widget_names(module_name: str, widget_class: str) -> list[str]:
    root = ElementTree.parse(Path(__file__).resolve().parents[2] / module_name / "Resources" / "UI" / f"{module_name}.ui").getroot()
    return [element.get("name") for element in root.iter("widget") if element.get("class") == widget_class]
