"""Synthetic Data: generate paired synthetic images and label maps with latent diffusion models.

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

from medgen.slicer.scene_job import JobRequest, SceneJobLogicMixin, optional_folder, run_selftest_on_synthetic_volume
from medgen.slicerqt.job_panel import JobPanel
from medgen.slicerqt.module_widget import ModuleWidgetMixin
from medgen.slicerqt.pair_table import PairTableMixin
from MedGenSynthesisLib import jobs, paired


class MedGenSynthesis(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Synthetic Data")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "MedGen")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedGen developers"]
        self.parent.helpText = _(
            "Generate synthetic 3D images together with matching label maps, or images conditioned on a "
            "label map, with latent diffusion and ControlNet models, to enlarge segmentation training sets. "
            "'Paired synthesis' trains a joint image+label model on volume+segmentation pairs (or an nnU-Net "
            "folder) and generates new pairs as volumes and segmentations, optionally as an nnU-Net dataset. "
            "Computation runs in a background process; Train and Generate turn into Cancel while they run. "
            "Use 'Setup' to install PyTorch and MONAI and to check that the computation works."
        )
        self.parent.acknowledgementText = _(
            "Developed by the MedGen developers. Diffusion networks and schedulers come from MONAI "
            "(MONAI Generative); the joint image+label and mask-conditioned methods follow their publications."
        )


@parameterNodeWrapper
class MedGenSynthesisParameterNode:
    """The panel's settings, saved with the scene.

    inputVolume - the volume the Setup selftest runs on.
    device - where the worker computes: auto (CUDA when usable), cpu or cuda.
    outputFolder - where job folders are written; empty means Slicer's temporary folder.
    trainingSource - train on the scene pairs of the table, or on a folder.
    trainingFolder - nnU-Net raw folder (imagesTr/labelsTr) or flat {case}_0000.nii.gz + {case}.nii.gz folder.
    modelOutputFolder - where the trained model goes; empty keeps it in the job folder.
    shapeI, shapeJ, shapeK - training grid in voxels.
    preset - tiny (CPU-friendly) or diff3 (the published recipe).
    modelFolder - the model Generate uses; set to the last trained model.
    pairCount, seed, samplingSteps, batchSize - what Generate makes, and how.
    nnunetFolder - nnU-Net raw folder receiving Dataset{ID}_{name}; empty means no export.
    nnunetDatasetId, nnunetName - the exported dataset's ID and name.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    outputFolder: pathlib.Path
    trainingSource: Annotated[str, Choice(["scene", "folder"])] = "scene"
    trainingFolder: pathlib.Path
    modelOutputFolder: pathlib.Path
    shapeI: int = 64
    shapeJ: int = 64
    shapeK: int = 64
    preset: Annotated[str, Choice(list(paired.PRESETS))] = "tiny"
    modelFolder: pathlib.Path
    pairCount: int = 10
    seed: int = 0
    samplingSteps: int = 100
    batchSize: int = 1
    nnunetFolder: pathlib.Path
    nnunetDatasetId: int = 501
    nnunetName: str = "MedGenSynthetic"


class MedGenSynthesisWidget(ModuleWidgetMixin, PairTableMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: paired synthesis (training pairs, Train, Generate) and Setup (dependencies, selftest)."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        """Load the .ui file, connect the scene and the job buttons."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedGenSynthesis.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # Node selectors in the .ui get the scene through the mrmlSceneChanged signal.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = MedGenSynthesisLogic()
        self.setupJobControls()
        self.setupPairedSynthesis()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def setupPairedSynthesis(self) -> None:
        """Train and Generate each get their own Apply/Cancel button, progress bar and status line."""
        locked = [self.ui.checkSetupButton, self.ui.installDependenciesButton]
        self.trainPanel = JobPanel(self.ui.trainButton, self.ui.trainProgressBar, self.ui.trainStatusLabel, locked)
        self.generatePanel = JobPanel(self.ui.generateButton, self.ui.generateProgressBar, self.ui.generateStatusLabel, locked)
        # Missing inputs are reported when the button is pressed, with what to do (BadInputError).
        self.trainPanel.set_can_start(True)
        self.generatePanel.set_can_start(True)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.generateButton.connect("clicked(bool)", self.onGenerateButton)
        self.ui.addPairButton.connect("clicked(bool)", self.onAddPairButton)
        self.ui.removePairButton.connect("clicked(bool)", self.onRemovePairButton)

    def onTrainButton(self) -> None:
        self.startOrCancel(self.trainPanel, lambda: self.logic.trainRequest(self._parameterNode, self.trainingPairs()))

    def onGenerateButton(self) -> None:
        self.startOrCancel(self.generatePanel, lambda: self.logic.generateRequest(self._parameterNode))


    def initializeParameterNode(self) -> None:
        """Get the scene's parameter node and pick the first volume when none is selected."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def _checkCanApply(self, caller=None, event=None) -> None:
        canApply = bool(self._parameterNode and self._parameterNode.inputVolume)
        self.ui.applyButton.toolTip = _("Run the selftest job on the selftest volume") if canApply else _("Select a selftest volume")
        self.jobPanel.set_can_start(canApply)


class MedGenSynthesisLogic(SceneJobLogicMixin, ScriptedLoadableModuleLogic):
    """Starts and imports this module's jobs; usable from the Python console without the panel.

    Examples: ``MedGenSynthesisLogic().runSelftest(volumeNode, "MedGenSynthesis")`` runs the selftest job
    to the end; ``logic.runJob(paired.train_request_from_scene(pairs, [64, 64, 64]))`` trains a model and
    ``logic.runJob(paired.generate_request(modelFolder, 4))`` imports 4 generated pairs
    (see :mod:`MedGenSynthesisLib.paired`).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self) -> MedGenSynthesisParameterNode:
        return MedGenSynthesisParameterNode(super().getParameterNode())

    def applyJobRequest(self, parameterNode: MedGenSynthesisParameterNode):
        """The job Apply starts for the panel's current settings."""
        return jobs.apply_job_request(parameterNode.inputVolume)

    def trainRequest(self, parameterNode: MedGenSynthesisParameterNode, pairs: list) -> JobRequest:
        """The ``synth-train`` job for the panel's settings and training ``pairs`` (used when the source is the scene)."""
        shape = [parameterNode.shapeI, parameterNode.shapeJ, parameterNode.shapeK]
        modelFolder = optional_folder(parameterNode.modelOutputFolder)
        if parameterNode.trainingSource == "folder":
            return paired.train_request_from_folder(
                optional_folder(parameterNode.trainingFolder), shape, parameterNode.preset, model_folder=modelFolder
            )
        return paired.train_request_from_scene(pairs, shape, parameterNode.preset, model_folder=modelFolder)

    def generateRequest(self, parameterNode: MedGenSynthesisParameterNode) -> JobRequest:
        """The ``synthesize`` job for the panel's Generate settings."""
        return paired.generate_request(
            optional_folder(parameterNode.modelFolder), parameterNode.pairCount, seed=parameterNode.seed,
            batch_size=parameterNode.batchSize, steps=parameterNode.samplingSteps,
            nnunet_folder=optional_folder(parameterNode.nnunetFolder),
            nnunet_dataset_id=parameterNode.nnunetDatasetId, nnunet_name=parameterNode.nnunetName,
        )

    def importResults(self, request: JobRequest, result: dict) -> dict:
        """Import as every module does, and remember a newly trained model for Generate."""
        imported = super().importResults(request, result)
        if request.kind == paired.TRAIN_KIND:
            self.getParameterNode().modelFolder = imported["model"]
        return imported


class MedGenSynthesisTest(ScriptedLoadableModuleTest):
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
        inputShape, outputShapes = run_selftest_on_synthetic_volume(MedGenSynthesisLogic(), "MedGenSynthesis")
        self.assertEqual(outputShapes, [inputShape])
        self.delayDisplay("Test passed")
