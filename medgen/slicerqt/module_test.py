"""The in-Slicer self-test every MedGen module runs from Slicer's "Reload and Test" button."""

from __future__ import annotations

import slicer

from medgen.slicer.scene_job import run_selftest_on_synthetic_volume


class SelftestModuleTestMixin:
    """Mixed into each module's ``<Module>Test(ScriptedLoadableModuleTest)`` with ``logicClass`` set to the
    module's Logic: the selftest job runs on a synthetic volume (CPU) and its output must land in the scene
    with the input's shape, and the MedGen sample subject (Sample Data) loads. Skipped while PyTorch is not
    installed."""

    logicClass: type | None = None

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_selftest_output_has_input_shape()
        self.setUp()
        self.test_sample_data_loads_into_the_scene()

    def test_selftest_output_has_input_shape(self) -> None:
        from medgen.slicer.dependencies import torch_report

        if not torch_report()["installed"]:
            self.skipTest("PyTorch is not installed; install it from the Setup section.")
        moduleName = type(self).__name__.removesuffix("Test")
        inputShape, outputShapes = run_selftest_on_synthetic_volume(self.logicClass(), moduleName)
        self.assertEqual(outputShapes, [inputShape])
        self.delayDisplay("Test passed")

    def test_sample_data_loads_into_the_scene(self) -> None:
        from medgen.slicerqt.sample_data import load_sample_into_scene, missing_packages

        missing = missing_packages()
        if missing:
            self.skipTest(f"{', '.join(missing)} not installed; install them from the Setup section.")
        nodes = load_sample_into_scene()
        self.assertEqual([node.GetClassName() for node in nodes], ["vtkMRMLScalarVolumeNode"] * 3 + ["vtkMRMLSegmentationNode"])
        self.assertEqual(nodes[3].GetSegmentation().GetNumberOfSegments(), 3)
        self.delayDisplay("Sample data loaded")
