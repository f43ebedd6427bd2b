"""TenVOO Fine-Tune: adapt a pretrained 3D segmentation network to a few labelled volumes with TenVOO adapters.

The panel only wires the GUI; jobs run in a separate worker process (see :mod:`medgen.slicer`).
torch and MONAI are never imported here, so the module loads before they are installed.
"""

import pathlib
from typing import Annotated

import qt
import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
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

from medgen.errors import BadInputError
from medgen.slicer.plots import LossPlot
from medgen.slicer.scene_job import JobRequest, SceneJobLogicMixin, optional_folder
from medgen.slicerqt.job_panel import JobState
from medgen.slicerqt.module_test import SelftestModuleTestMixin
from medgen.slicerqt.module_widget import ModuleWidgetMixin
from medgen.slicerqt.pair_table import PairTableMixin
from medgen.slicerqt.sample_data import register_sample_data
from TenVOOSlicerLib import adaptation, jobs


class TenVOOSlicer(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("TenVOO Fine-Tune")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "MedGen")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedGen developers"]
        self.parent.helpText = _(
            "Fine-tune a pretrained 3D segmentation network (the built-in deepbet brain extraction, or a MedGen "
            "model folder) on a few volume+segmentation pairs with TenVOO tensor-network adapters (or LoRA, "
            "BitFit, ...), which train a small fraction of the weights. Segment names must be the model's "
            "class names. 'Preview' counts the trainable parameters; 'Train' writes an adapter folder and draws "
            "the loss in the 'TenVOO training loss' chart; 'Save adapter' copies it where you choose and "
            "'Load adapter' checks a saved one against the model; 'Segment' applies the adapted model to a "
            "volume; 'Compare' reports the Dice of the base and the adapted model on a held-out volume with its "
            "reference segmentation. "
            "Computation runs in a background process; each button turns into Cancel while its job runs. "
            "Use 'Setup' to install PyTorch and MONAI and to check that the computation works."
        )
        self.parent.acknowledgementText = _(
            "Developed by the MedGen developers. TenVOO adapters follow the TenVOO method for "
            "parameter-efficient fine-tuning of volumetric networks; networks come from MONAI."
        )
        # Sample Data lists the MedGen sample subject once, whichever MedGen modules register it
        slicer.app.connect("startupCompleted()", register_sample_data)


@parameterNodeWrapper
class TenVOOSlicerParameterNode:
    """The panel's settings, saved with the scene.

    inputVolume - the volume the Setup selftest runs on.
    device - where the worker computes: auto (CUDA when usable), cpu or cuda.
    outputFolder - where job folders are written; empty means Slicer's temporary folder.
    modelSource - the built-in deepbet brain extraction, or a MedGen segmentation model folder.
    modelFolder - that model folder.
    method, rank - the adaptation method and its rank (TenVOO and LoRA).
    steps, learningRate - training length and learning rate.
    validationVolume, validationSegmentation - optional held-out pair for early stopping.
    adapterOutputFolder - where Train saves the adapter; empty keeps it in the job folder.
    adapterFolder - the adapter Segment and Compare use; set to the last trained adapter.
    segmentVolume - the volume Segment runs on.
    compareVolume, compareSegmentation - the held-out pair Compare scores both models on.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    outputFolder: pathlib.Path
    modelSource: Annotated[str, Choice([adaptation.BUILTIN_MODEL, "folder"])] = adaptation.BUILTIN_MODEL
    modelFolder: pathlib.Path
    method: Annotated[str, Choice(list(adaptation.METHODS))] = "tenvoo-l"
    rank: int = 4
    steps: int = 60
    learningRate: float = 1e-3
    validationVolume: vtkMRMLScalarVolumeNode
    validationSegmentation: vtkMRMLSegmentationNode
    adapterOutputFolder: pathlib.Path
    adapterFolder: pathlib.Path
    segmentVolume: vtkMRMLScalarVolumeNode
    compareVolume: vtkMRMLScalarVolumeNode
    compareSegmentation: vtkMRMLSegmentationNode


class TenVOOSlicerWidget(ModuleWidgetMixin, PairTableMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: model and method, training pairs, Train, Segment, Compare, and Setup."""

    def setup(self) -> None:
        """Load the .ui file, connect the scene and the job buttons, then this module's sections."""
        self.setupPanel(TenVOOSlicerLogic(), self.setupFineTuning)

    def setupFineTuning(self) -> None:
        """Train, Segment and Compare each get their own button (turning into Cancel), progress bar and status line."""
        self.trainPanel = self.sectionPanel("train", loss_plot=self.logic.lossPlot)
        self.segmentPanel = self.sectionPanel("segment")
        self.comparePanel = self.sectionPanel("compare")
        # Missing inputs are reported when a button is pressed, with what to do (BadInputError).
        for panel in (self.trainPanel, self.segmentPanel, self.comparePanel):
            panel.set_can_start(True)
        self.trainingReadout = adaptation.TrainingReadout()
        self.ui.previewButton.connect("clicked(bool)", self.onPreviewButton)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.compareButton.connect("clicked(bool)", self.onCompareButton)
        self.ui.saveAdapterButton.connect("clicked(bool)", self.onSaveAdapterButton)
        self.ui.loadAdapterButton.connect("clicked(bool)", self.onLoadAdapterButton)
        self.ui.addPairButton.connect("clicked(bool)", self.onAddPairButton)
        self.ui.removePairButton.connect("clicked(bool)", self.onRemovePairButton)

    def onPreviewButton(self) -> None:
        """Build the model with the chosen method here and show how many parameters would train."""
        with slicer.util.tryWithErrorDisplay("Counting the parameters failed.", waitCursor=True):
            counts = self.logic.previewParameterCount(self._parameterNode)
            self.ui.parameterCountLabel.text = adaptation.format_parameter_count(*counts)

    def onTrainButton(self) -> None:
        self.trainingReadout = adaptation.TrainingReadout()
        self.startOrCancel(self.trainPanel, lambda: self.logic.finetuneRequest(self._parameterNode, self.trainingPairs()),
                           onEvent=self.onTrainingEvent)
        if self.trainPanel.state is JobState.RUNNING:
            # The panel empties the chart and draws each loss; show it in the layout's plot view.
            slicer.modules.plots.logic().ShowChartInLayout(self.logic.lossPlot.chart_node)

    def onTrainingEvent(self, event: dict) -> None:
        """Show the latest loss and validation Dice while training runs."""
        self.trainingReadout.record(event)
        self.ui.lossLabel.text = self.trainingReadout.text()

    def onSegmentButton(self) -> None:
        self.startOrCancel(self.segmentPanel, lambda: self.logic.segmentRequest(self._parameterNode))

    def onCompareButton(self) -> None:
        self.startOrCancel(self.comparePanel, lambda: self.logic.compareRequest(self._parameterNode),
                           onImported=self.showDiceTable)

    def showDiceTable(self, imported: dict) -> None:
        self.ui.diceLabel.text = adaptation.format_dice_rows(imported["dice"])

    def onSaveAdapterButton(self) -> None:
        """Ask for a new or empty folder and copy the adapter in use there."""
        destination = qt.QFileDialog.getExistingDirectory(self.parent, _("Choose an empty folder for the adapter"))
        if not destination:
            return
        with slicer.util.tryWithErrorDisplay("Saving the adapter failed.", waitCursor=True):
            saved = self.logic.saveAdapter(destination, self._parameterNode)
            self.ui.adapterStatusLabel.text = f"Saved to {saved}; Segment and Compare use this copy."

    def onLoadAdapterButton(self) -> None:
        """Ask for a saved adapter folder, check it against the selected model and use it."""
        folder = qt.QFileDialog.getExistingDirectory(self.parent, _("Choose a saved adapter folder"))
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay("Loading the adapter failed.", waitCursor=True):
            summary = self.logic.loadAdapter(folder, self._parameterNode)
            self.ui.adapterStatusLabel.text = f"Loaded {adaptation.format_adapter(summary)} from {folder}."

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


class TenVOOSlicerLogic(SceneJobLogicMixin, ScriptedLoadableModuleLogic):
    """Starts and imports this module's jobs; usable from the Python console without the panel.

    Examples: ``TenVOOSlicerLogic().runSelftest(volumeNode, "TenVOOSlicer")`` runs the selftest job
    to the end; ``logic.runJob(adaptation.finetune_request("deepbet", pairs, "tenvoo-l", {"rank": 4}))``
    trains an adapter (see :mod:`TenVOOSlicerLib.adaptation`); ``logic.startJob(request, onEvent=logic.lossPlot.record)``
    draws its loss in the scene; ``logic.saveAdapter(folder)`` and ``logic.loadAdapter(folder)`` keep and reuse it.
    """

    #: chart (and node-name prefix) of the training loss; one set of nodes, reused by every run
    LOSS_CHART_NAME = "TenVOO training loss"

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.lossPlot = LossPlot(slicer.mrmlScene, self.LOSS_CHART_NAME)

    def getParameterNode(self) -> TenVOOSlicerParameterNode:
        return TenVOOSlicerParameterNode(super().getParameterNode())

    def applyJobRequest(self, parameterNode: TenVOOSlicerParameterNode):
        """The job Apply (Setup section) starts for the panel's current settings."""
        return jobs.apply_job_request(parameterNode.inputVolume)

    def model(self, parameterNode: TenVOOSlicerParameterNode) -> str:
        """``"deepbet"`` or the chosen model folder."""
        if parameterNode.modelSource == adaptation.BUILTIN_MODEL:
            return adaptation.BUILTIN_MODEL
        folder = optional_folder(parameterNode.modelFolder)
        if folder is None:
            raise BadInputError("Choose the model folder, or use the built-in deepbet model.")
        return adaptation.model_source(folder)

    def previewParameterCount(self, parameterNode: TenVOOSlicerParameterNode) -> tuple[int, int]:
        """``(trainable, total)`` parameters of the model with the chosen method (computed here, not in a job)."""
        options = adaptation.method_options(parameterNode.method, parameterNode.rank)
        return adaptation.preview_parameter_count(self.model(parameterNode), parameterNode.method, options)

    def finetuneRequest(self, parameterNode: TenVOOSlicerParameterNode, pairs: list) -> JobRequest:
        """The ``finetune`` job for the panel's settings and training ``pairs``."""
        validation = None
        if parameterNode.validationVolume or parameterNode.validationSegmentation:
            validation = adaptation.TrainingPair(parameterNode.validationVolume, parameterNode.validationSegmentation)
        return adaptation.finetune_request(
            self.model(parameterNode), pairs, parameterNode.method,
            adaptation.method_options(parameterNode.method, parameterNode.rank),
            validation=validation, adapter_folder=optional_folder(parameterNode.adapterOutputFolder),
            steps=parameterNode.steps, lr=parameterNode.learningRate,
        )

    def segmentRequest(self, parameterNode: TenVOOSlicerParameterNode) -> JobRequest:
        """The ``infer`` job: the (adapted) model on the chosen volume."""
        return adaptation.infer_request(self.model(parameterNode), parameterNode.segmentVolume,
                                        optional_folder(parameterNode.adapterFolder))

    def compareRequest(self, parameterNode: TenVOOSlicerParameterNode) -> JobRequest:
        """The ``evaluate`` job: base vs adapted Dice on the held-out pair."""
        return adaptation.compare_request(self.model(parameterNode), parameterNode.compareVolume,
                                          parameterNode.compareSegmentation, optional_folder(parameterNode.adapterFolder))

    def saveAdapter(self, destination, parameterNode: TenVOOSlicerParameterNode | None = None) -> pathlib.Path:
        """Copy the adapter in use (the last trained one) into ``destination``, a new or empty folder (never
        overwritten); the copy becomes the adapter Segment and Compare use.

        Raises:
            BadInputError: no adapter yet, or ``destination`` holds something already.
        """
        parameterNode = parameterNode or self.getParameterNode()
        adapter = optional_folder(parameterNode.adapterFolder)
        if adapter is None:
            raise BadInputError("There is no adapter to save yet: train one first (or load a saved one).")
        saved = adaptation.save_adapter_copy(adapter, destination)
        parameterNode.adapterFolder = saved
        return saved

    def loadAdapter(self, folder, parameterNode: TenVOOSlicerParameterNode | None = None) -> dict:
        """Check the saved adapter in ``folder`` against the selected model and make it the adapter in use.

        Returns:
            the adapter's method, options and trained parameter count (see :func:`adaptation.check_adapter`).

        Raises:
            ModelError: the adapter does not fit the model or was trained on other base weights (hash mismatch).
        """
        parameterNode = parameterNode or self.getParameterNode()
        summary = adaptation.check_adapter(self.model(parameterNode), folder)
        parameterNode.adapterFolder = pathlib.Path(folder)
        return summary

    def importResults(self, request: JobRequest, result: dict) -> dict:
        """Import as every module does, and remember a newly trained adapter for Segment and Compare."""
        imported = super().importResults(request, result)
        if request.kind == adaptation.FINETUNE_KIND:
            self.getParameterNode().adapterFolder = imported["adapter"]
        return imported


class TenVOOSlicerTest(SelftestModuleTestMixin, ScriptedLoadableModuleTest):
    """In-Slicer test: the selftest job runs on a synthetic volume and its output lands in the scene."""

    logicClass = TenVOOSlicerLogic
