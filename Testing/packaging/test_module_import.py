"""Each module file imports outside Slicer and describes itself; no heavy or Qt imports where they do harm."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from slicer_stubs import MODULE_NAMES, REPOSITORY, slicer_gui_stubs

HEAVY_PACKAGES = {"torch", "monai"}
QT_PACKAGES = {"qt", "ctk"}


def imported_roots(path: Path, file_scope_only: bool) -> set[str]:
    """Top-level package names imported by ``path`` (only at file scope, or anywhere in the file)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if file_scope_only else ast.walk(tree)
    roots = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def module_python_files(module_name: str) -> list[Path]:
    folder = REPOSITORY / module_name
    return [folder / f"{module_name}.py", *sorted((folder / f"{module_name}Lib").glob("*.py"))]


@pytest.mark.parametrize("module_name", MODULE_NAMES)
def test_module_class_describes_itself(module_name):
    """Mirrors Slicer's generic module test: title, categories, contributors and texts are set."""
    with slicer_gui_stubs():
        module_file = __import__(module_name)
        parent = type("ModuleParent", (), {})()
        getattr(module_file, module_name)(parent)
    assert parent.title
    assert parent.categories == ["MedGen"]
    assert parent.contributors and all(parent.contributors)
    assert len(parent.helpText) > 50
    assert len(parent.acknowledgementText) > 20


@pytest.mark.parametrize("module_name", MODULE_NAMES)
def test_module_file_defines_the_template_classes(module_name):
    with slicer_gui_stubs():
        module_file = __import__(module_name)
        for suffix in ("", "Widget", "Logic", "Test", "ParameterNode"):
            assert hasattr(module_file, module_name + suffix), module_name + suffix
        logic_class = getattr(module_file, f"{module_name}Logic")
        assert callable(logic_class.applyJobRequest) and callable(logic_class.startJob)
        # Slicer's "Reload and Test" runs <Module>Test().runTest(): the shared selftest, on this module's Logic
        assert getattr(module_file, f"{module_name}Test").logicClass is logic_class


@pytest.mark.parametrize("module_name", MODULE_NAMES)
def test_apply_starts_a_job_on_the_selected_volume(module_name, mrml_scene):
    """Until each module's own job kind lands, Apply runs the selftest on the input volume."""
    volume = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "patient CT")
    with slicer_gui_stubs():
        module_file = __import__(module_name)
        parameters = type("Parameters", (), {"inputVolume": volume})()
        request = getattr(module_file, f"{module_name}Logic")().applyJobRequest(parameters)
    assert request.kind == "selftest"
    assert request.input_nodes == {"image": volume}
    assert request.reference_node is volume
    (output_import,) = request.imports
    assert output_import.output == "image" and output_import.node_name.startswith("patient CT ")


@pytest.mark.parametrize("path", [p for m in MODULE_NAMES for p in module_python_files(m)], ids=lambda p: p.name)
def test_no_torch_or_monai_at_file_scope(path):
    """Slicer imports every module file at startup, before the user may have installed torch."""
    assert not imported_roots(path, file_scope_only=True) & HEAVY_PACKAGES


def test_no_qt_outside_module_files_and_slicerqt():
    """<Module>Lib and medgen must run under slicer-core, where qt and ctk do not exist."""
    library_files = [p for m in MODULE_NAMES for p in (REPOSITORY / m / f"{m}Lib").glob("*.py")]
    library_files += [p for p in (REPOSITORY / "medgen").rglob("*.py") if "slicerqt" not in p.parts]
    offenders = [str(p.relative_to(REPOSITORY)) for p in library_files if imported_roots(p, False) & QT_PACKAGES]
    assert not offenders
    assert len(library_files) > 6
