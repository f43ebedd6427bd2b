"""Synthetic Data: generate paired synthetic images and label maps with latent diffusion models.

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

from medgen.errors import MedGenError
from medgen.slicer.scene_job import (
    JobRequest,
    SceneJobLogicMixin,
    TrainingPair,
    optional_folder,
)
from medgen.slicerqt.module_test import SelftestModuleTestMixin
from medgen.slicerqt.module_widget import ModuleWidgetMixin
from medgen.slicerqt.pair_table import PairTableMixin
from medgen.slicerqt.sample_data import register_sample_data
from MedGenSynthesisLib import candidate_report, from_masks, jobs, paired


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
            "'From masks' trains a mask-conditioned model on segmented source-modality volumes plus unlabelled "
            "target-modality volumes, then generates target-modality images for segmentations (segment names "
            "must be the model's organs), keeps the candidates that an independent checker agrees with and "
            "loads them as volumes and segmentations, with a table of every candidate's scores. "
            "Computation runs in a background process; Train and Generate turn into Cancel while they run. "
            "Use 'Setup' to install PyTorch and MONAI and to check that the computation works."
        )
        self.parent.acknowledgementText = _(
            "Developed by the MedGen developers. Diffusion networks and schedulers come from MONAI "
            "(MONAI Generative); the joint image+label and mask-conditioned methods follow their publications."
        )
        # Sample Data lists the MedGen sample subject once, whichever MedGen modules register it
        slicer.app.connect("startupCompleted()", register_sample_data)


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

    From masks (see :mod:`MedGenSynthesisLib.from_masks`); the checked segmentations/volumes and the
    target modality combo box are read from the widgets, as their choices depend on the scene and the model:
    maskTrainingSource - train on the checked scene nodes, or on the source and target folders.
    maskSourceFolder, maskTargetFolder - nnU-Net-named source pairs, and target-modality volume files.
    sourceModality, trainTargetModality, region - the prompt fields of the model to train.
    maskShapeI, maskShapeJ, maskShapeK, maskPreset, maskEncoding - its grid, size preset and mask encoding.
    maskPseudoLabels - train the ControlNet also on the target volumes with the checker's masks (extension).
    maskMirror - the latent UNet and ControlNet stages flip each training volume + mask at random along every voxel axis (extension).
    maskModelOutputFolder - where the trained mask model goes; empty keeps it in the job folder.
    maskSource - masks from the checked segmentations, or from maskFolder (label maps in organ values).
    maskModelFolder - the mask model generation uses; set to the last trained one.
    candidates, candidateChunk, maskSteps, guidanceScale, conditioningScale, maskSeed - what is generated per mask,
        and how (conditioningScale: the ControlNet strength).
    checkerFolder - segmentation model scoring the candidates; empty uses the job's default checker.
    minAvgConfidence, minAvgIou, minOrganIou, minOrganConfidence, topK - the acceptance thresholds.
    maskNnunetFolder, maskNnunetDatasetId, maskNnunetName - nnU-Net export of the accepted pairs.
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
    maskTrainingSource: Annotated[str, Choice(["scene", "folder"])] = "scene"
    maskSourceFolder: pathlib.Path
    maskTargetFolder: pathlib.Path
    sourceModality: str = "CT"
    trainTargetModality: str = "T2 MRI"
    region: str = "abdomen"
    maskShapeI: int = 32
    maskShapeJ: int = 32
    maskShapeK: int = 32
    maskPreset: Annotated[str, Choice(list(from_masks.PRESETS))] = "tiny"
    maskEncoding: Annotated[str, Choice(list(from_masks.ENCODINGS))] = "one-hot"
    maskPseudoLabels: bool = False
    maskMirror: bool = False
    maskModelOutputFolder: pathlib.Path
    maskSource: Annotated[str, Choice(["scene", "folder"])] = "scene"
    maskFolder: pathlib.Path
    maskModelFolder: pathlib.Path
    candidates: int = 20
    candidateChunk: int = 10
    maskSteps: int = 50
    guidanceScale: float = 7.0
    conditioningScale: float = 1.0
    maskSeed: int = 0
    checkerFolder: pathlib.Path
    minAvgConfidence: float = from_masks.DEFAULT_THRESHOLDS["avg_confidence"]
    minAvgIou: float = from_masks.DEFAULT_THRESHOLDS["avg_iou"]
    minOrganIou: float = from_masks.DEFAULT_THRESHOLDS["organ_iou"]
    minOrganConfidence: float = from_masks.DEFAULT_THRESHOLDS["organ_confidence"]
    topK: int = from_masks.DEFAULT_THRESHOLDS["top_k"]
    maskNnunetFolder: pathlib.Path
    maskNnunetDatasetId: int = 502
    maskNnunetName: str = "MedGenFromMasks"


class MedGenSynthesisWidget(ModuleWidgetMixin, PairTableMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: paired synthesis (training pairs, Train, Generate), from masks (Train mask model,
    Generate from masks, the candidate table) and Setup (dependencies, selftest)."""

    def setup(self) -> None:
        """Load the .ui file, connect the scene and the job buttons, then this module's sections."""
        self.setupPanel(MedGenSynthesisLogic(), self.setupPairedSynthesis, self.setupFromMasks)

    def setupPairedSynthesis(self) -> None:
        """Train and Generate each get their own Apply/Cancel button, progress bar and status line."""
        self.trainPanel = self.sectionPanel("train")
        self.generatePanel = self.sectionPanel("generate")
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

    def setupFromMasks(self) -> None:
        """Train mask model and Generate from masks each get their own button (turning into Cancel),
        progress bar and status line; generation also shows per-mask progress and the candidate table."""
        self.maskTrainPanel = self.sectionPanel("maskTrain")
        self.fromMasksPanel = self.sectionPanel("fromMasks")
        # Missing inputs are reported when a button is pressed, with what to do (BadInputError).
        self.maskTrainPanel.set_can_start(True)
        self.fromMasksPanel.set_can_start(True)
        self.generationProgress = candidate_report.GenerationProgress()
        self.fromMasksRequest = None
        self.ui.maskTrainButton.connect("clicked(bool)", self.onMaskTrainButton)
        self.ui.fromMasksButton.connect("clicked(bool)", self.onFromMasksButton)
        self.ui.maskModelFolderPathLineEdit.connect("currentPathChanged(QString)", self.onMaskModelFolderChanged)

    def onMaskTrainButton(self) -> None:
        self.startOrCancel(self.maskTrainPanel, lambda: self.logic.maskTrainRequest(
            self._parameterNode, self.ui.maskSourceSegmentationsComboBox.checkedNodes(),
            self.ui.maskTargetVolumesComboBox.checkedNodes()))

    def onFromMasksButton(self) -> None:
        def makeRequest() -> JobRequest:
            self.fromMasksRequest = self.logic.maskGenerateRequest(
                self._parameterNode, self.ui.maskSegmentationsComboBox.checkedNodes(), self.ui.targetModalityComboBox.currentText)
            return self.fromMasksRequest

        if not self.fromMasksPanel.busy:
            self.generationProgress = candidate_report.GenerationProgress()
        self.startOrCancel(self.fromMasksPanel, makeRequest, onEvent=self.onFromMasksEvent, onImported=self.showFromMasksResults)

    def onFromMasksEvent(self, event: dict) -> None:
        """Show per-mask and per-candidate progress; after a cancel, load the pairs accepted so far."""
        self.generationProgress.record(event)
        self.ui.maskProgressLabel.text = self.generationProgress.text()
        if event.get("event") == "error" and event.get("kind") == "cancelled" and self.generationProgress.job_dir:
            with slicer.util.tryWithErrorDisplay("Loading the pairs accepted before the cancel failed."):
                self.showFromMasksResults(self.logic.importAcceptedSoFar(self.fromMasksRequest, self.generationProgress.job_dir))

    def showFromMasksResults(self, imported: dict) -> None:
        """Fill the candidate table (every candidate's scores and decision) and the summary line."""
        headers, cells = candidate_report.table_cells(imported["candidates"])
        table = self.ui.candidateTable
        table.clear()
        table.setColumnCount(len(headers))
        table.setHorizontalHeaderLabels(headers)
        table.setRowCount(len(cells))
        for row, texts in enumerate(cells):
            for column, text in enumerate(texts):
                table.setItem(row, column, qt.QTableWidgetItem(text))
        self.ui.fromMasksSummaryLabel.text = candidate_report.summary(imported)

    def onMaskModelFolderChanged(self, path: str) -> None:
        """Offer the chosen model's target modalities and list its organs (or say why the folder is unusable)."""
        combo = self.ui.targetModalityComboBox
        combo.clear()
        if optional_folder(path) is None:
            self.ui.maskModelOrgansLabel.text = "Choose a model folder."
            return
        try:
            info = self.logic.modelInfo(path)
        except MedGenError as error:
            self.ui.maskModelOrgansLabel.text = str(error)
            return
        except ImportError as error:  # reading the folder loads MedGen's library, which needs torch and MONAI
            self.ui.maskModelOrgansLabel.text = _("{error}: press Install dependencies first.").format(error=error)
            return
        combo.addItems(list(info.target_modalities))
        self.ui.maskModelOrgansLabel.text = ", ".join(info.organ_names)


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
    (see :mod:`MedGenSynthesisLib.paired`); ``logic.runJob(from_masks.generate_request(maskModel, [segmentation]))``
    imports the accepted images generated for a segmentation (see :mod:`MedGenSynthesisLib.from_masks`).
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

    def maskTrainRequest(self, parameterNode: MedGenSynthesisParameterNode, sourceSegmentations: list,
                         targetVolumes: list) -> JobRequest:
        """The ``maskgen-train`` job: each source segmentation with its reference volume, plus the target
        volumes (used when the training data is the scene), or the two folders."""
        settings = dict(
            source_modality=parameterNode.sourceModality, target_modality=parameterNode.trainTargetModality,
            region=parameterNode.region, shape=[parameterNode.maskShapeI, parameterNode.maskShapeJ, parameterNode.maskShapeK],
            preset=parameterNode.maskPreset, encoding=parameterNode.maskEncoding,
            model_folder=optional_folder(parameterNode.maskModelOutputFolder),
            target_pseudo_labels=parameterNode.maskPseudoLabels,
            controlnet_flip_axes=[0, 1, 2] if parameterNode.maskMirror else [],
            unet_flip_axes=[0, 1, 2] if parameterNode.maskMirror else [],
        )
        if parameterNode.maskTrainingSource == "folder":
            return from_masks.train_request(source_folder=optional_folder(parameterNode.maskSourceFolder),
                                            target_folder=optional_folder(parameterNode.maskTargetFolder), **settings)
        pairs = [TrainingPair(from_masks.mask_reference(segmentation), segmentation) for segmentation in sourceSegmentations]
        return from_masks.train_request(pairs, targetVolumes, **settings)

    def maskGenerateRequest(self, parameterNode: MedGenSynthesisParameterNode, segmentations: list,
                            targetModality: str) -> JobRequest:
        """The ``maskgen`` job on the checked ``segmentations`` (or the mask folder) for the panel's settings."""
        fromFolder = parameterNode.maskSource == "folder"
        return from_masks.generate_request(
            optional_folder(parameterNode.maskModelFolder), [] if fromFolder else segmentations, targetModality,
            mask_folder=optional_folder(parameterNode.maskFolder) if fromFolder else None,
            candidates=parameterNode.candidates, chunk=parameterNode.candidateChunk, steps=parameterNode.maskSteps,
            guidance_scale=parameterNode.guidanceScale, conditioning_scale=parameterNode.conditioningScale,
            seed=parameterNode.maskSeed,
            thresholds={"avg_confidence": parameterNode.minAvgConfidence, "avg_iou": parameterNode.minAvgIou,
                        "organ_iou": parameterNode.minOrganIou, "organ_confidence": parameterNode.minOrganConfidence,
                        "top_k": parameterNode.topK},
            checker_folder=optional_folder(parameterNode.checkerFolder),
            nnunet_folder=optional_folder(parameterNode.maskNnunetFolder),
            nnunet_dataset_id=parameterNode.maskNnunetDatasetId, nnunet_name=parameterNode.maskNnunetName,
        )

    def modelInfo(self, folder) -> from_masks.ModelInfo:
        """Organs and target modalities of a mask-conditioned model folder."""
        return from_masks.model_info(optional_folder(folder))

    def candidateTable(self, report: dict) -> list:
        """The rows of the accepted/rejected table for a ``maskgen`` report (see :func:`candidate_report.candidate_rows`)."""
        return candidate_report.candidate_rows(report)

    def importAcceptedSoFar(self, request: JobRequest, jobDir) -> dict:
        """After a cancelled ``maskgen`` job: load the pairs it accepted before it stopped (nothing if none)."""
        return request.import_pairs(pathlib.Path(jobDir) / "outputs")

    def importResults(self, request: JobRequest, result: dict) -> dict:
        """Import as every module does, and remember a newly trained model for Generate / Generate from masks."""
        imported = super().importResults(request, result)
        if request.kind == paired.TRAIN_KIND:
            self.getParameterNode().modelFolder = imported["model"]
        elif request.kind == from_masks.TRAIN_KIND:
            self.getParameterNode().maskModelFolder = imported["model"]
        return imported


class MedGenSynthesisTest(SelftestModuleTestMixin, ScriptedLoadableModuleTest):
    """In-Slicer test: the selftest job runs on a synthetic volume and its output lands in the scene."""

    logicClass = MedGenSynthesisLogic
