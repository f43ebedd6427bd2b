"""Cross-Modal Translation: translate a volume into another modality (for example T2 to T1) with diffusion.

The panel only wires the GUI; jobs run in a separate worker process (see :mod:`medgen.slicer`).
torch and MONAI are never imported here, so the module loads before they are installed.
"""

import pathlib
from typing import Annotated

import qt
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

from medgen.errors import BadInputError, MedGenError
from medgen.slicer.scene_job import JobRequest, SceneJobLogicMixin, optional_folder
from medgen.slicerqt.module_test import SelftestModuleTestMixin
from medgen.slicerqt.module_widget import ModuleWidgetMixin
from medgen.slicerqt.sample_data import register_sample_data
from CrossModalTranslateLib import jobs, translation

#: the application setting that remembers the last valid model folder between sessions
MODEL_FOLDER_SETTING = "CrossModalTranslate/ModelFolder"


class CrossModalTranslate(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Cross-Modal Translation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "MedGen")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedGen developers"]
        self.parent.helpText = _(
            "Translate a volume into another imaging modality (for example T2 to T1) with a diffusion model "
            "guided by a modality-independent structure map (LMI), keeping the source's voxel grid. "
            "'Translate' runs a model folder on the source volume; the result is a new volume named after the "
            "source and both modalities, which 'Segment in Segment Editor' opens for segmentation. "
            "'Train a model' trains a model on volumes of the target modality only (from the scene or a folder). "
            "Computation runs in a background process; Translate and Train turn into Cancel while they run. "
            "Use 'Setup' to install PyTorch and MONAI and to check that the computation works."
        )
        self.parent.acknowledgementText = _(
            "Developed by the MedGen developers. The translation follows the MIDiffusion method (local "
            "modality-independent features); networks and schedulers come from MONAI."
        )
        # Sample Data lists the MedGen sample subject once, whichever MedGen modules register it
        slicer.app.connect("startupCompleted()", register_sample_data)


@parameterNodeWrapper
class CrossModalTranslateParameterNode:
    """The panel's settings, saved with the scene.

    inputVolume - the volume the Setup selftest runs on.
    device - where the worker computes: auto (CUDA when usable), cpu or cuda.
    outputFolder - where job folders are written; empty means Slicer's temporary folder.
    sourceVolume - the volume to translate.
    sourceModality - its modality (optional; names the output).
    modelFolder - the translation model; remembered in the application settings.
    sampler, samplingSteps, seed - how the translation is sampled.
    memoryBudgetMb - LMI chunk budget in MB; 0 means the model's own setting.
    translatedVolume - the latest translation, which the Segment Editor button opens.
    trainingSource - train on the volumes checked in the scene, or on a folder of volume files.
    trainingFolder - that folder.
    targetModality - the modality of the training volumes, stored in the model.
    mode, preset, gridI, gridJ, gridK, trainingSteps - the model and its training.
    modelOutputFolder - where the trained model goes; empty keeps it in the job folder.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    outputFolder: pathlib.Path
    sourceVolume: vtkMRMLScalarVolumeNode
    sourceModality: str = ""
    modelFolder: pathlib.Path
    sampler: Annotated[str, Choice(list(translation.SAMPLERS))] = "ddim"
    samplingSteps: int = 50
    seed: int = 0
    memoryBudgetMb: float = 0.0
    translatedVolume: vtkMRMLScalarVolumeNode
    trainingSource: Annotated[str, Choice(["scene", "folder"])] = "scene"
    trainingFolder: pathlib.Path
    targetModality: str = "T1"
    mode: Annotated[str, Choice(list(translation.MODES))] = "2.5d"
    preset: Annotated[str, Choice(list(translation.PRESETS))] = "tiny"
    gridI: int = 32
    gridJ: int = 32
    gridK: int = 32
    trainingSteps: int = 2000  # the tiny preset's: fewer steps learn no contrast (TranslationConfig.tiny)
    modelOutputFolder: pathlib.Path


class CrossModalTranslateWidget(ModuleWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: Translate (source, model, sampler, output, Segment Editor), Train a model, and Setup."""

    def setup(self) -> None:
        """Load the .ui file, connect the scene and the job buttons, then this module's sections."""
        self.setupPanel(CrossModalTranslateLogic(), self.setupTranslation)

    def setupTranslation(self) -> None:
        """Translate and Train each get their own button (turning into Cancel), progress bar and status line."""
        self.translatePanel = self.sectionPanel("translate")
        self.trainPanel = self.sectionPanel("train")
        # Missing inputs are reported when a button is pressed, with what to do (BadInputError).
        self.translatePanel.set_can_start(True)
        self.trainPanel.set_can_start(True)
        self.ui.translateButton.connect("clicked(bool)", self.onTranslateButton)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.segmentEditorButton.connect("clicked(bool)", self.onSegmentEditorButton)
        self.ui.modelFolderButton.connect("directoryChanged(QString)", self.onModelFolderChanged)
        self.ui.translatedVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onTranslatedVolumeSelected)

    def onTranslateButton(self) -> None:
        self.startOrCancel(self.translatePanel, lambda: self.logic.panelTranslationRequest(self._parameterNode),
                           onImported=self.onTranslated)

    def onTrainButton(self) -> None:
        checkedVolumes = list(self.ui.trainingVolumesSelector.checkedNodes())
        self.startOrCancel(self.trainPanel, lambda: self.logic.panelTrainRequest(self._parameterNode, checkedVolumes),
                           onImported=self.onTrained)

    # The callbacks below run when a job ends, possibly after the user left the module (which drops the widget's
    # parameter node): they go through the Logic's parameter node, as the other modules' imports do.
    def onTranslated(self, imported: dict) -> None:
        """The new translation becomes the output volume the Segment Editor button opens."""
        self.logic.getParameterNode().translatedVolume = imported["translated"]
        self.onTranslatedVolumeSelected(imported["translated"])

    def onTrained(self, imported: dict) -> None:
        """A newly trained model becomes the model to translate with (and is remembered)."""
        self.logic.getParameterNode().modelFolder = imported["model"]
        self.onModelFolderChanged(str(imported["model"]))

    def onModelFolderChanged(self, path: str | None = None) -> None:
        """Describe the chosen model folder, or say what is wrong with it; remember it once it is valid.

        ``path`` is the directory button's new folder: the parameter node may learn it only after this slot runs.
        """
        folder = optional_folder(self._parameterNode.modelFolder if path is None else path)
        if folder is None:
            self.ui.modelInfoLabel.text = _("No model chosen: choose a model folder or train a model.")
            return
        try:
            info = self.logic.modelInfo(folder)
        except MedGenError as error:  # reported in the panel; Translate refuses the folder again
            self.ui.modelInfoLabel.text = str(error)
            return
        except ImportError as error:  # reading the folder loads MedGen's library, which needs torch and MONAI
            self.ui.modelInfoLabel.text = _("{error}: press Install dependencies first.").format(error=error)
            return
        self.ui.modelInfoLabel.text = info.describe()
        qt.QSettings().setValue(MODEL_FOLDER_SETTING, str(folder))

    def updateSegmentEditorButton(self) -> None:
        """The Segment Editor button works on the output volume, so it is enabled only when there is one."""
        self.onTranslatedVolumeSelected(self._parameterNode.translatedVolume if self._parameterNode else None)

    def onTranslatedVolumeSelected(self, volumeNode) -> None:
        """The output selector changed (a new translation, another pick, or the output was deleted)."""
        self.ui.segmentEditorButton.enabled = volumeNode is not None

    def onSegmentEditorButton(self) -> None:
        """Switch to the Segment Editor with a segmentation on the output volume selected."""
        with slicer.util.tryWithErrorDisplay(_("Opening the Segment Editor failed."), waitCursor=True):
            volumeNode = self._parameterNode.translatedVolume
            segmentationNode = self.logic.segmentationFor(volumeNode)
            slicer.util.selectModule("SegmentEditor")
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
            editor.setSegmentationNode(segmentationNode)
            editor.setSourceVolumeNode(volumeNode)

    def initializeParameterNode(self) -> None:
        """Get the scene's parameter node, pick the first volume and the remembered model when none is chosen."""
        self.setParameterNode(self.logic.getParameterNode())
        firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if firstVolumeNode and not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = firstVolumeNode
        if firstVolumeNode and not self._parameterNode.sourceVolume:
            self._parameterNode.sourceVolume = firstVolumeNode
        self.restoreModelFolder()
        self.onModelFolderChanged()
        self.updateSegmentEditorButton()

    def restoreModelFolder(self) -> None:
        """Start from the model folder of the last session when the scene has none chosen."""
        if optional_folder(self._parameterNode.modelFolder) is None:
            remembered = qt.QSettings().value(MODEL_FOLDER_SETTING, "")
            if remembered:
                self._parameterNode.modelFolder = pathlib.Path(remembered)

    def _checkCanApply(self, caller=None, event=None) -> None:
        canApply = bool(self._parameterNode and self._parameterNode.inputVolume)
        self.ui.applyButton.toolTip = _("Run the selftest job on the selftest volume") if canApply else _("Select a selftest volume")
        self.jobPanel.set_can_start(canApply)


class CrossModalTranslateLogic(SceneJobLogicMixin, ScriptedLoadableModuleLogic):
    """Starts and imports this module's jobs; usable from the Python console without the panel.

    Examples::

        logic = slicer.util.getModuleLogic("CrossModalTranslate")
        model = logic.train([t1a, t1b], targetModality="T1", steps=200)      # blocks; returns the model folder
        print(logic.modelInfo(model).describe())
        output = logic.translate(t2Node, model, sourceModality="T2", steps=50)  # blocks; returns the new volume node

    ``translationRequest``/``trainRequest`` build the same jobs for :meth:`startJob` (non-blocking).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self) -> CrossModalTranslateParameterNode:
        return CrossModalTranslateParameterNode(super().getParameterNode())

    def applyJobRequest(self, parameterNode: CrossModalTranslateParameterNode) -> JobRequest:
        """The job the Setup section's Apply ("Run selftest") starts."""
        return jobs.apply_job_request(parameterNode.inputVolume)

    def modelInfo(self, modelFolder) -> translation.ModelInfo:
        """What a model folder holds; raises a clear error naming what is missing (see :func:`translation.model_info`)."""
        return translation.model_info(modelFolder)

    def translationRequest(self, sourceVolumeNode, modelFolder, *, sampler: str = "ddim", steps: int = 50, seed: int = 0,
                           sourceModality: str = "", memoryBudgetMb: float | None = None) -> JobRequest:
        """The ``translate`` job: ``sourceVolumeNode`` into the model's modality (checked before anything starts)."""
        return translation.translate_request(sourceVolumeNode, modelFolder, sampler=sampler, steps=steps, seed=seed,
                                             source_modality=sourceModality, memory_budget_mb=memoryBudgetMb)

    def trainRequest(self, volumesOrFolder, outputFolder=None, *, targetModality: str, steps: int | None = None,
                     mode: str = "2.5d", grid=(32, 32, 32), preset: str = "tiny", seed: int = 0) -> JobRequest:
        """The ``translate-train`` job on scene volumes (a list of nodes) or a folder of volume files.

        ``outputFolder`` is where the model goes (must be empty); None keeps it in the job folder.
        """
        options = dict(target_modality=targetModality, grid=grid, mode=mode, preset=preset, steps=steps,
                       model_folder=outputFolder, seed=seed)
        if isinstance(volumesOrFolder, (str, pathlib.Path)):
            return translation.train_request_from_folder(volumesOrFolder, **options)
        return translation.train_request_from_scene(list(volumesOrFolder), **options)

    def translate(self, sourceVolumeNode, modelFolder, *, device: str = "auto", jobRoot=None, **options):
        """Translate to the end and return the new volume node (options as :meth:`translationRequest`)."""
        request = self.translationRequest(sourceVolumeNode, modelFolder, **options)
        return self.runJob(request, jobRoot=jobRoot, device=device)["translated"]

    def train(self, volumesOrFolder, outputFolder=None, *, device: str = "auto", jobRoot=None, **options) -> pathlib.Path:
        """Train to the end and return the model folder (options as :meth:`trainRequest`)."""
        return self.runJob(self.trainRequest(volumesOrFolder, outputFolder, **options), jobRoot=jobRoot, device=device)["model"]

    def segmentationFor(self, volumeNode):
        """The segmentation to edit on ``volumeNode``: an existing one drawn on it, else a new empty one next to it."""
        return translation.segmentation_for(volumeNode)

    def panelTranslationRequest(self, parameterNode: CrossModalTranslateParameterNode) -> JobRequest:
        """The ``translate`` job for the panel's Translate settings."""
        return self.translationRequest(
            parameterNode.sourceVolume, optional_folder(parameterNode.modelFolder), sampler=parameterNode.sampler,
            steps=parameterNode.samplingSteps, seed=parameterNode.seed, sourceModality=parameterNode.sourceModality,
            memoryBudgetMb=parameterNode.memoryBudgetMb or None,
        )

    def panelTrainRequest(self, parameterNode: CrossModalTranslateParameterNode, checkedVolumes: list) -> JobRequest:
        """The ``translate-train`` job for the panel's Train settings and the volumes checked in the scene."""
        source = optional_folder(parameterNode.trainingFolder) if parameterNode.trainingSource == "folder" else checkedVolumes
        if source is None:
            raise BadInputError("Choose the training folder, or train on volumes checked in the scene.")
        modelFolder, jobRoot = optional_folder(parameterNode.modelOutputFolder), optional_folder(parameterNode.outputFolder)
        if modelFolder and jobRoot and modelFolder.resolve() in (jobRoot.resolve(), *jobRoot.resolve().parents):
            raise BadInputError(f"The model output folder {modelFolder} would hold the job folders (Output folder "
                                f"{jobRoot}), so it would not be empty when the model arrives; choose another one.")
        return self.trainRequest(
            source, modelFolder, targetModality=parameterNode.targetModality,
            steps=parameterNode.trainingSteps, mode=parameterNode.mode, preset=parameterNode.preset,
            grid=(parameterNode.gridI, parameterNode.gridJ, parameterNode.gridK),
        )


class CrossModalTranslateTest(SelftestModuleTestMixin, ScriptedLoadableModuleTest):
    """In-Slicer test: the selftest job runs on a synthetic volume and its output lands in the scene."""

    logicClass = CrossModalTranslateLogic
