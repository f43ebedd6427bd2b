"""Cross-Modal Translation: translate a volume into another modality (for example MR to CT) with diffusion.

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
from CrossModalTranslateLib import jobs


class CrossModalTranslate(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Cross-Modal Translation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "MedGen")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedGen developers"]
        self.parent.helpText = _(
            "Translate a volume into another imaging modality (for example MR to CT) with a diffusion model "
            "guided by a modality-independent structure map, keeping the input's voxel grid. "
            "Computation runs in a background process; Apply turns into Cancel while it runs. "
            "Use 'Setup' to install PyTorch and MONAI and to check that the computation works."
        )
        self.parent.acknowledgementText = _(
            "Developed by the MedGen developers. The translation follows the MIDiffusion method (local "
            "modality-independent features); networks and schedulers come from MONAI."
        )


@parameterNodeWrapper
class CrossModalTranslateParameterNode:
    """The panel's settings, saved with the scene.

    inputVolume - the volume the job runs on.
    device - where the worker computes: auto (CUDA when usable), cpu or cuda.
    outputFolder - where job folders are written; empty means Slicer's temporary folder.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    outputFolder: pathlib.Path


class CrossModalTranslateWidget(ModuleWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
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
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CrossModalTranslate.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # Node selectors in the .ui get the scene through the mrmlSceneChanged signal.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = CrossModalTranslateLogic()
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


class CrossModalTranslateLogic(SceneJobLogicMixin, ScriptedLoadableModuleLogic):
    """Starts and imports this module's jobs; usable from the Python console without the panel.

    Example: ``CrossModalTranslateLogic().runSelftest(volumeNode, "CrossModalTranslate")`` runs the selftest job
    to the end and returns the output volume node(s).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self) -> CrossModalTranslateParameterNode:
        return CrossModalTranslateParameterNode(super().getParameterNode())

    def applyJobRequest(self, parameterNode: CrossModalTranslateParameterNode):
        """The job Apply starts for the panel's current settings."""
        return jobs.apply_job_request(parameterNode.inputVolume)


class CrossModalTranslateTest(ScriptedLoadableModuleTest):
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
        inputShape, outputShapes = run_selftest_on_synthetic_volume(CrossModalTranslateLogic(), "CrossModalTranslate")
        self.assertEqual(outputShapes, [inputShape])
        self.delayDisplay("Test passed")
