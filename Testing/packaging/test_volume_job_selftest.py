"""End to end on a real MRML scene: a module Logic runs the selftest worker and imports its output."""

from __future__ import annotations

import time
import types
import unittest

import numpy as np
import pytest
import slicer
import slicer.util

from medgen.slicer.scene_job import SceneJobLogicMixin, selftest_request
from slicer_stubs import fake_app, slicer_gui_stubs

# Each test starts a worker process that imports torch and MONAI: tens of seconds on a 2-core machine.
pytestmark = pytest.mark.slow


@pytest.fixture
def input_volume(mrml_scene):
    voxels = np.random.default_rng(0).random((6, 8, 10), dtype=np.float32)
    volume = slicer.util.addVolumeFromArray(voxels, name="patient MR")
    # outside the Slicer app no plugin files new nodes in the subject hierarchy; do what the user would
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml_scene)
    hierarchy.CreateItem(hierarchy.CreateFolderItem(hierarchy.GetSceneItemID(), "patient study"), volume)
    return volume


def test_run_job_imports_the_output_next_to_the_input(input_volume, mrml_scene, tmp_path):
    outputs = SceneJobLogicMixin().runJob(selftest_request(input_volume, "Check"), jobRoot=tmp_path, device="cpu")
    assert [node.GetName() for node in outputs.values()] == ["patient MR Check selftest"]
    assert slicer.util.arrayFromVolume(outputs["image"]).shape == (6, 8, 10)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml_scene)
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(outputs["image"])) == hierarchy.GetItemParent(
        hierarchy.GetItemByDataNode(input_volume)) == hierarchy.GetItemByName("patient study")


def test_job_panel_follows_a_real_worker_to_the_import(input_volume, mrml_scene, tmp_path):
    with slicer_gui_stubs():
        from medgen.slicerqt.job_panel import JobPanel, JobState

        apply_button = types.SimpleNamespace(text="Apply", enabled=True)
        progress_bar = types.SimpleNamespace(setRange=lambda low, high: None, setValue=lambda value: None)
        status_label = types.SimpleNamespace(text="")
        panel = JobPanel(apply_button, progress_bar, status_label)
        logic, request, imported = SceneJobLogicMixin(), selftest_request(input_volume, "Panel"), []
        runner = logic.startJob(request, jobRoot=tmp_path, device="cpu", onEvent=panel.handle_event)
        panel.track(runner, lambda result: imported.extend(logic.importResults(request, result).values()), "cpu")
        deadline = time.monotonic() + 120
        while panel.busy and time.monotonic() < deadline:
            panel.poll()  # what the panel's QTimer does every 200 ms inside Slicer
            time.sleep(0.05)
    assert panel.state is JobState.IDLE, status_label.text
    assert [node.GetName() for node in imported] == ["patient MR Panel selftest"]
    assert any(event["event"] == "progress" for event in runner.events)


def test_reload_and_test_runs_the_selftest_and_loads_the_sample_data(mrml_scene, monkeypatch, tmp_path):
    """What Slicer's "Reload and Test" button runs for a module (its Test class; the same mixin for all three)."""
    app = fake_app(cache_path=str(tmp_path / "cache"))
    app.temporaryPath = str(tmp_path)
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", lambda **layers: None)  # needs the app's slice views
    with slicer_gui_stubs():
        module_file = __import__("CrossModalTranslate")
        result = unittest.TestResult()
        module_file.CrossModalTranslateTest("runTest").run(result)
    assert result.wasSuccessful() and not result.skipped, result.errors + result.failures + result.skipped
    # the sample-data test runs last, on a cleared scene
    assert [node.GetName() for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")] == [
        "MedGenBrain_T1", "MedGenBrain_T2_simulated", "MedGenBrain_PD_simulated"]
    assert [node.GetName() for node in slicer.util.getNodesByClass("vtkMRMLSegmentationNode")] == ["MedGenBrain_tissues"]
