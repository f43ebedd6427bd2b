"""Minimal stand-ins for the parts of Slicer that exist only inside the Slicer application.

slicer-core gives real MRML, ``slicer.util`` and VTK, but not the Qt GUI: ``qt``, ``ctk``,
``slicer.ScriptedLoadableModule``, ``slicer.parameterNodeWrapper``, ``slicer.i18n`` and ``slicer.app``. These
stand-ins are just enough to import a module file and instantiate its classes; they are installed
only inside :func:`slicer_gui_stubs` and removed afterwards, so no other test sees them.
"""

from __future__ import annotations

import contextlib
import sys
import types
import unittest
from pathlib import Path
from unittest import mock

import slicer

REPOSITORY = Path(__file__).resolve().parents[2]
MODULE_NAMES = ("TenVOOSlicer", "MedGenSynthesis", "CrossModalTranslate")


class FakeWidget(types.SimpleNamespace):
    """A Qt widget reduced to its properties and the slots connected to it."""

    def connect(self, signal, slot):
        self.slots = {**getattr(self, "slots", {}), signal: slot}

    def setRange(self, minimum, maximum):
        self.range = (minimum, maximum)

    def setValue(self, value):
        self.value = value


class FakeTable(FakeWidget):
    """A QTableWidget holding one widget per cell."""

    def __init__(self):
        super().__init__(rows=[], selected=-1)

    @property
    def rowCount(self):
        return len(self.rows)

    def insertRow(self, row):
        self.rows.insert(row, {})

    def removeRow(self, row):
        del self.rows[row]

    def currentRow(self):
        return self.selected

    def setCellWidget(self, row, column, widget):
        self.rows[row][column] = widget

    def cellWidget(self, row, column):
        return self.rows[row][column]


class FakeNodeSelector(types.SimpleNamespace):
    """qMRMLNodeComboBox: the node the user picked, and the scene it lists."""

    def setMRMLScene(self, scene):
        self.scene, self.node = scene, None

    def currentNode(self):
        return self.node


class FakeRunner:
    """A worker process that runs until the test says how it ended."""

    def __init__(self):
        self.cancelled, self.returncode, self.result, self.error = False, None, None, None

    def poll(self):
        return self.returncode is None

    def cancel(self):
        self.cancelled = True


def fake_ui(module_name: str) -> types.SimpleNamespace:
    """``self.ui`` of a module widget: a :class:`FakeWidget` for every widget named in its .ui file
    (a :class:`FakeTable` for table widgets), each button showing the text the .ui gives it."""
    import xml.etree.ElementTree as ElementTree

    root = ElementTree.parse(REPOSITORY / module_name / "Resources" / "UI" / f"{module_name}.ui").getroot()
    widgets = {}
    for element in root.iter("widget"):
        text = element.find("property[@name='text']/string")
        widgets[element.get("name")] = FakeTable() if element.get("class") == "QTableWidget" else FakeWidget(
            text="" if text is None else text.text, enabled=True, toolTip="")
    return types.SimpleNamespace(**widgets)


def fake_app(cache_path: str = "") -> types.SimpleNamespace:
    """``slicer.app`` as far as the modules use it: wait cursor, testing mode, the cache folder, and the slots
    connected to its signals (``connections``: signal -> slots)."""
    connections = {}
    return types.SimpleNamespace(setOverrideCursor=lambda cursor: None, restoreOverrideCursor=lambda: None,
                                 testingEnabled=lambda: True, cachePath=cache_path, connections=connections,
                                 connect=lambda signal, slot: connections.setdefault(signal, []).append(slot))


def _scripted_loadable_module() -> types.ModuleType:
    """The four base classes of a scripted module, reduced to what the module files rely on."""
    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent
            self.moduleName = type(self).__name__.removesuffix("Widget")

        def setup(self):
            pass  # the real one adds the developer's Reload & Test section to self.layout

        def resourcePath(self, filename):
            module_dir = Path(sys.modules[type(self).__module__].__file__).parent
            return str(module_dir / "Resources" / filename)

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = type(self).__name__.removesuffix("Logic")

        def getParameterNode(self):
            # The real base keeps one scripted-module node per module in the scene.
            return slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")

    module.ScriptedLoadableModule = ScriptedLoadableModule
    module.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    module.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=1000):
            pass  # the real one shows the message in the Slicer window for msec

    module.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    return module


def _parameter_node_wrapper() -> types.ModuleType:
    """``@parameterNodeWrapper`` wraps a scripted-module node; ``Choice`` only records its choices."""
    module = types.ModuleType("slicer.parameterNodeWrapper")

    def parameterNodeWrapper(cls):
        def __init__(self, node):
            self.parameterNode = node

        cls.__init__ = __init__
        return cls

    class Choice:
        def __init__(self, choices):
            self.choices = choices

    module.parameterNodeWrapper = parameterNodeWrapper
    module.Choice = Choice
    return module


def _i18n() -> types.ModuleType:
    module = types.ModuleType("slicer.i18n")
    module.tr = lambda text: text
    module.translate = lambda context, text: text
    return module


@contextlib.contextmanager
def slicer_gui_stubs():
    """Install the stand-ins and put the module folders on ``sys.path``; undo both on exit.

    Yields:
        the ``qt`` stand-in (a MagicMock), so a test can look at what was created from it.
    """
    qt = mock.MagicMock(name="qt")
    stubs = {
        "qt": qt,
        "ctk": mock.MagicMock(name="ctk"),
        "slicer.ScriptedLoadableModule": _scripted_loadable_module(),
        "slicer.parameterNodeWrapper": _parameter_node_wrapper(),
        "slicer.i18n": _i18n(),
    }
    modules_before = set(sys.modules)
    app_before = getattr(slicer, "app", None)
    if app_before is None:
        slicer.app = fake_app()
    module_dirs = [str(REPOSITORY / name) for name in MODULE_NAMES]
    stub_dependent_roots = MODULE_NAMES + tuple(f"{name}Lib" for name in MODULE_NAMES)
    with mock.patch.object(sys, "path", module_dirs + sys.path):
        for name, stub in stubs.items():
            sys.modules[name] = stub
            if name.startswith("slicer."):
                setattr(slicer, name.split(".", 1)[1], stub)
        try:
            yield qt
        finally:
            if app_before is None:
                del slicer.app
            for name in stubs:
                del sys.modules[name]
                if name.startswith("slicer."):
                    delattr(slicer, name.split(".", 1)[1])
            # Forget only what was imported against the stand-ins: the module files, their Lib
            # packages and medgen.slicerqt; library modules imported meanwhile stay as they are.
            for name in set(sys.modules) - modules_before:
                if name.split(".")[0] in stub_dependent_roots or name.startswith("medgen.slicerqt"):
                    del sys.modules[name]


@contextlib.contextmanager
def fake_module_widget(module_name: str, monkeypatch, parameters: dict, record=lambda request, kwargs: request):
    """A module's widget on fake widgets (every name in its .ui) with a real Logic whose jobs are recorded.

    Args:
        module_name: e.g. ``"TenVOOSlicer"``.
        monkeypatch: pytest's fixture (undoes the ``slicer`` patches).
        parameters: the parameter-node fields the widget reads.
        record: what to keep per started job, from ``(request, startJob keyword arguments)``.

    Yields:
        ``(widget, started)``: ``started`` collects ``record(...)`` for every job the widget starts.
    """
    import slicer

    monkeypatch.setattr(slicer, "app", fake_app(), raising=False)
    monkeypatch.setattr(slicer, "qMRMLNodeComboBox", FakeNodeSelector, raising=False)
    with slicer_gui_stubs():
        module_file = __import__(module_name)
        widget = getattr(module_file, f"{module_name}Widget")()
        widget.ui = fake_ui(module_name)
        widget.logic = getattr(module_file, f"{module_name}Logic")()
        started = []
        monkeypatch.setattr(widget.logic, "startJob", lambda request, **kwargs: started.append(record(request, kwargs)) or FakeRunner())
        widget._parameterNode = types.SimpleNamespace(**parameters)
        monkeypatch.setattr(widget.logic, "getParameterNode", lambda: widget._parameterNode)
        widget.setupJobControls()
        yield widget, started
