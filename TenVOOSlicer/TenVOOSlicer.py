"""TenVOO Fine-Tune: adapt a pretrained 3D network to a few labelled volumes with TenVOO adapters.

The panel only wires the GUI; jobs run in a separate worker process (see :mod:`medgen.slicer`).
torch and MONAI are never imported here, so the module loads before they are installed.
"""

import pathlib
from typing import Annotated

import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from medgen.slicer.scene_job import SceneJobLogicMixin, run_selftest_on_synthetic_volume
from medgen.slicerqt.module_widget import ModuleWidgetMixin
from TenVOOSlicerLib import jobs


class TenVOOSlicer(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("TenVOO Fine-Tune")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "MedGen")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedGen developers"]
        self.parent.helpText = _(
            "Fine-tune a pretrained 3D segmentation or generative network on a few labelled volumes "
            "with TenVOO tensor-network adapters, which train a small fraction of the weights. "
            "Computation runs in a background process; Apply turns into Cancel while it runs. "
            "Use 'Setup' to install PyTorch and MONAI and to check that the computation works."
        )
        self.parent.acknowledgementText = _(
            "Developed by the MedGen developers. TenVOO adapters follow the TenVOO method for "
            "parameter-efficient fine-tuning of volumetric networks; networks come from MONAI."
        )


@parameterNodeWrapper
class TenVOOSlicerParameterNode:
    """The panel's settings, saved with the scene.

    inputVolume - the volume the job runs on.
    device - where the worker computes: auto (CUDA when usable), cpu or cuda.
    outputFolder - where job folders are written; empty means Slicer's temporary folder.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    outputFolder: pathlib.Path


class TenVOOSlicerWidget(ModuleWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: inputs, device, output folder, Apply/Cancel, progress and Setup."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        """Load the .ui file, connect the scene and the job buttons."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TenVOOSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # Node selectors in the .ui get the scene through the mrmlSceneChanged signal.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = TenVOOSlicerLogic()
        self.setupJobControls()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Get the scene's parameter node and pick the first volume when none is selected."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def _checkCanApply(self, caller=None, event=None) -> None:
        canApply = bool(self._parameterNode and self._parameterNode.inputVolume)
        self.ui.applyButton.toolTip = _("Run the job on the input volume") if canApply else _("Select an input volume")
        self.jobPanel.set_can_start(canApply)


class TenVOOSlicerLogic(SceneJobLogicMixin, ScriptedLoadableModuleLogic):
    """Starts and imports this module's jobs; usable from the Python console without the panel.

    Example: ``TenVOOSlicerLogic().runSelftest(volumeNode, "TenVOOSlicer")`` runs the selftest job
    to the end and returns the output volume node(s).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self) -> TenVOOSlicerParameterNode:
        return TenVOOSlicerParameterNode(super().getParameterNode())

    def applyJobRequest(self, parameterNode: TenVOOSlicerParameterNode):
        """The job Apply starts for the panel's current settings."""
        return jobs.apply_job_request(parameterNode.inputVolume)


class TenVOOSlicerTest(ScriptedLoadableModuleTest):
    """In-Slicer test: the selftest job runs on a synthetic volume and its output lands in the scene."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_selftest_output_has_input_shape()

    def test_selftest_output_has_input_shape(self) -> None:
        from medgen.slicer.dependencies import torch_report

        if not torch_report()["installed"]:
            self.skipTest("PyTorch is not installed; install it from the Setup section.")
        inputShape, outputShapes = run_selftest_on_synthetic_volume(TenVOOSlicerLogic(), "TenVOOSlicer")
        self.assertEqual(outputShapes, [inputShape])
        self.delayDisplay("Test passed")
