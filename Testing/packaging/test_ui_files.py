"""Static checks of each module's Qt Designer file against the code that uses it."""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from slicer_stubs import MODULE_NAMES, REPOSITORY

SHARED_WIDGET_CODE = REPOSITORY / "medgen" / "slicerqt" / "module_widget.py"
# Widgets that list scene nodes and therefore need the scene passed down from the top widget.
SCENE_WIDGET_CLASSES = {"qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox", "qMRMLSubjectHierarchyTreeView",
                        "qMRMLSubjectHierarchyComboBox", "qMRMLSegmentSelectorWidget"}


def ui_tree(module_name: str) -> ElementTree.Element:
    return ElementTree.parse(REPOSITORY / module_name / "Resources" / "UI" / f"{module_name}.ui").getroot()


def widget_classes(root: ElementTree.Element) -> dict[str, str]:
    """Object name -> class of every widget in the .ui file."""
    return {widget.get("name"): widget.get("class") for widget in root.iter("widget")}


def ui_attribute_references(path: Path) -> set[str]:
    """Names used as ``self.ui.<name>`` in a Python file."""
    references = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            references.add(node.attr)
    return references


def parameter_node_fields(module_name: str) -> set[str]:
    """Field names of the ``@parameterNodeWrapper`` class in the module file."""
    tree = ast.parse((REPOSITORY / module_name / f"{module_name}.py").read_text(encoding="utf-8"))
    wrapped = [
        node for node in tree.body
        if isinstance(node, ast.ClassDef)
        and any(getattr(decorator, "id", None) == "parameterNodeWrapper" for decorator in node.decorator_list)
    ]
    assert len(wrapped) == 1, "exactly one @parameterNodeWrapper class"
    return {item.target.id for item in wrapped[0].body if isinstance(item, ast.AnnAssign)}


@pytest.mark.parametrize("module_name", MODULE_NAMES)
def test_top_widget_is_a_named_qmrmlwidget(module_name):
    top = ui_tree(module_name).find("widget")
    assert top.get("class") == "qMRMLWidget"
    assert top.get("name") == module_name


@pytest.mark.parametrize("module_name", MODULE_NAMES)
def test_every_self_ui_reference_names_a_widget(module_name):
    names = set(widget_classes(ui_tree(module_name)))
    references = ui_attribute_references(REPOSITORY / module_name / f"{module_name}.py")
    references |= ui_attribute_references(SHARED_WIDGET_CODE)
    if "PairTableMixin" in (REPOSITORY / module_name / f"{module_name}.py").read_text(encoding="utf-8"):
        references |= ui_attribute_references(REPOSITORY / "medgen" / "slicerqt" / "pair_table.py")
    assert references, "the widget code uses self.ui"
    assert references <= names, f"missing in the .ui: {sorted(references - names)}"


@pytest.mark.parametrize("module_name", MODULE_NAMES)
def test_parameter_names_match_parameter_node_fields(module_name):
    bound = {
        prop.findtext("string")
        for prop in ui_tree(module_name).iter("property")
        if prop.get("name") == "SlicerParameterName"
    }
    assert bound == parameter_node_fields(module_name)


@pytest.mark.parametrize("module_name", MODULE_NAMES)
def test_node_selectors_receive_the_scene(module_name):
    root = ui_tree(module_name)
    selectors = {name for name, cls in widget_classes(root).items() if cls in SCENE_WIDGET_CLASSES}
    wired = {
        connection.findtext("receiver")
        for connection in root.iter("connection")
        if connection.findtext("sender") == module_name
        and connection.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
        and connection.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    assert selectors, "the panel has an input volume selector"
    assert selectors <= wired, f"not wired to mrmlSceneChanged: {sorted(selectors - wired)}"


@pytest.mark.parametrize("module_name", MODULE_NAMES)
def test_setup_section_starts_collapsed_and_offers_both_actions(module_name):
    root = ui_tree(module_name)
    setup = next(w for w in root.iter("widget") if w.get("name") == "setupCollapsibleButton")
    collapsed = next(p for p in setup.findall("property") if p.get("name") == "collapsed")
    assert collapsed.findtext("bool") == "true"
    assert {"installDependenciesButton", "checkSetupButton"} <= {w.get("name") for w in setup.iter("widget")}
