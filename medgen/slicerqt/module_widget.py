"""What every MedGen module panel does the same way: construction, loading the .ui, scene/parameter-node
lifecycle and the job buttons.

The job buttons are Apply/Cancel, "Install dependencies" and "Check setup". Each module's Widget
mixes in :class:`ModuleWidgetMixin` (first, so its ``__init__`` is the Widget's) and keeps only what differs
per module: ``setup()`` calling :meth:`ModuleWidgetMixin.setupPanel` with its Logic and its sections,
``initializeParameterNode()`` and ``_checkCanApply()``. The .ui (``Resources/UI/<module>.ui``) must name
``applyButton``, ``progressBar``, ``statusLabel``, ``checkSetupButton``, ``installDependenciesButton`` and
``setupStatusLabel``; ``self.logic`` is a :class:`medgen.slicer.scene_job.SceneJobLogicMixin` and the
parameter node has ``inputVolume``, ``device`` and ``outputFolder``."""

from __future__ import annotations

import importlib
import sys

import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from medgen.slicer.dependencies import ensure_dependencies, format_torch_report, torch_report
from medgen.slicer.scene_job import JobRequest, optional_folder, selftest_request
from medgen.slicerqt.job_panel import BusyLock, JobPanel


class ModuleWidgetMixin:
    """The Slicer widget lifecycle and the job buttons shared by the MedGen module panels."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setupPanel(self, logic, *sectionSetups) -> None:
        """The whole of a module's ``setup()``: load ``Resources/UI/<module>.ui``, keep ``logic``, create the
        job buttons, call each of ``sectionSetups`` (the module's own sections), then follow the scene."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath(f"UI/{self.moduleName}.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # Node selectors in the .ui get the scene through the mrmlSceneChanged signal.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = logic
        self.setupJobControls()
        for sectionSetup in sectionSetups:
            sectionSetup()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed: running jobs are stopped."""
        for panel in getattr(self, "jobPanels", ()):  # none when setup() failed part-way
            panel.stop()
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module; a running job keeps running."""
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        """Drop the parameter node before the scene that holds it is cleared."""
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Re-create the parameter node in the new scene when the panel is visible."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def setParameterNode(self, inputParameterNode) -> None:
        """Bind the GUI to ``inputParameterNode`` (through the .ui's SlicerParameterName properties)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def setupJobControls(self) -> None:
        """Create the job panel and connect the buttons; call once from ``setup()``. The module's other job
        panels share :attr:`busyLock`, so Check setup and Install dependencies stay off while any job runs."""
        self.busyLock = BusyLock([self.ui.checkSetupButton, self.ui.installDependenciesButton])
        self.jobPanel = JobPanel(
            self.ui.applyButton,
            self.ui.progressBar,
            self.ui.statusLabel,
            locked_while_busy=self.busyLock,
        )
        #: every job panel of the module, stopped when the widget is destroyed
        self.jobPanels = [self.jobPanel]
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.checkSetupButton.connect("clicked(bool)", self.onCheckSetupButton)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependenciesButton)

    def sectionPanel(self, name: str, **options) -> JobPanel:
        """The job panel of a section's button ``<name>Button`` with its ``<name>ProgressBar`` and
        ``<name>StatusLabel``, sharing :attr:`busyLock`; ``options`` go to :class:`JobPanel` (e.g. ``loss_plot``)."""
        panel = JobPanel(getattr(self.ui, f"{name}Button"), getattr(self.ui, f"{name}ProgressBar"),
                         getattr(self.ui, f"{name}StatusLabel"), self.busyLock, **options)
        self.jobPanels.append(panel)
        return panel

    def onApplyButton(self) -> None:
        """Start the module's job, or cancel it when one is running (the button reads Cancel then)."""
        self.startOrCancel(self.jobPanel, lambda: self.logic.applyJobRequest(self._parameterNode))

    def startOrCancel(self, jobPanel: JobPanel, makeRequest, onEvent=None, onImported=None) -> None:
        """A job button's click: cancel ``jobPanel``'s running job, else start ``makeRequest()`` there
        (``onEvent`` and ``onImported`` as in :meth:`startJob`)."""
        if jobPanel.busy:
            jobPanel.cancel()
            return
        with slicer.util.tryWithErrorDisplay("Starting the job failed.", waitCursor=True):
            self.startJob(makeRequest(), jobPanel, onEvent=onEvent, onImported=onImported)

    def onCheckSetupButton(self) -> None:
        """Show torch/CUDA/device and run the built-in selftest job on the selected volume."""
        with slicer.util.tryWithErrorDisplay("Checking the setup failed.", waitCursor=True):
            report = torch_report()
            self.ui.setupStatusLabel.text = format_torch_report(report)
            inputVolume = self._parameterNode.inputVolume
            if not report["installed"]:
                return  # the label already says to install the dependencies; the worker would fail
            if inputVolume is None:
                self.ui.statusLabel.text = "Select an input volume to run the selftest job on."
                return
            self.startJob(selftest_request(inputVolume, output_suffix=self.moduleName))

    def onInstallDependenciesButton(self) -> None:
        """Install torch (PyTorch extension) and the module's requirements, each after confirmation."""
        with slicer.util.tryWithErrorDisplay("Installing the dependencies failed.", waitCursor=True):
            # Every module of the extension shares one installed Resources folder, hence the module prefix.
            requirementsFile = self.resourcePath(f"{self.moduleName}-requirements.txt")
            restartNeeded = ensure_dependencies(requirementsFile, requester=self.moduleName)
            status = format_torch_report(torch_report())
            if restartNeeded:
                status += " | restart Slicer to use the updated packages"
            self.ui.setupStatusLabel.text = status

    def onReload(self) -> None:
        """Reload this module's ``<Module>Lib`` submodules too, so the developer Reload button sees their edits."""
        libName = f"{self.moduleName}Lib"
        # Submodules sort after their package; reloading them first lets the package re-import fresh code.
        for name in sorted((name for name in sys.modules if name.split(".")[0] == libName), reverse=True):
            importlib.reload(sys.modules[name])
        super().onReload()

    def startJob(self, request: JobRequest, jobPanel: JobPanel | None = None, onEvent=None, onImported=None) -> None:
        """Start ``request`` in a worker process and let ``jobPanel`` (default: Apply's) follow it.

        Callers show errors (``tryWithErrorDisplay``): a request can be refused before anything starts.

        Args:
            onEvent: also called with each worker event (e.g. a live loss readout).
            onImported: called with what the Logic imported once the job succeeded (e.g. to show a table).
        """
        jobPanel = jobPanel or self.jobPanel
        device = self._parameterNode.device
        outputFolder = optional_folder(self._parameterNode.outputFolder)

        def handleEvent(event: dict) -> None:
            jobPanel.handle_event(event)
            if onEvent:
                onEvent(event)

        def importResults(result: dict) -> None:
            imported = self.logic.importResults(request, result)
            if onImported:
                onImported(imported)

        runner = self.logic.startJob(
            request,
            jobRoot=outputFolder and str(outputFolder),
            device=device,
            onEvent=handleEvent,
        )
        jobPanel.track(runner, importResults, device)
