"""Configure and install the extension with real cmake against the stand-in Slicer in stub_slicer/."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slicer_stubs import MODULE_NAMES, REPOSITORY

STUB_SLICER_DIR = Path(__file__).resolve().parent / "stub_slicer"
SCRIPTED_MODULES_DIR = "lib/Slicer-5.13/qt-scripted-modules"  # what the stub sets
METADATA_NAMES = ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS")


def cmake_executable() -> str:
    """The cmake next to this Python (PyPI ``cmake`` in the venv), else the one on PATH."""
    beside_python = Path(sys.executable).with_name("cmake")
    found = str(beside_python) if beside_python.exists() else shutil.which("cmake")
    if found is None:
        pytest.skip("cmake is not installed (pip install cmake)")
    return found


def configure(source_dir: Path, build_dir: Path, *extra_args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [cmake_executable(), "-S", str(source_dir), "-B", str(build_dir), f"-DSlicer_DIR={STUB_SLICER_DIR}",
         "-DBUILD_TESTING=ON", *extra_args],
        capture_output=True, text=True, timeout=120,
    )


def recorded_modules(output: str) -> dict[str, dict[str, list[str]]]:
    """The stub's "STUB_SLICER module=... scripts=... resources=..." lines, in configure order."""
    modules = {}
    for match in re.finditer(r"STUB_SLICER module=(\S+) generic_tests=(\S+) scripts=(\S*) resources=(\S*)", output):
        name, generic_tests, scripts, resources = match.groups()
        modules[name] = {"generic_tests": generic_tests, "scripts": scripts.split(";"), "resources": resources.split(";")}
    return modules


@pytest.fixture(scope="module")
def extension_build(tmp_path_factory):
    """Configure MedGen and install it into a prefix; returns (configure output, install prefix)."""
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("project(MedGen) enables C/C++, and no C compiler is installed")
    build_dir = tmp_path_factory.mktemp("medgen-build")
    result = configure(REPOSITORY, build_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    prefix = build_dir / "install"
    installed = subprocess.run([cmake_executable(), "--install", str(build_dir), "--prefix", str(prefix)],
                               capture_output=True, text=True, timeout=120)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return result.stdout, prefix / SCRIPTED_MODULES_DIR


def module_files_on_disk(module_name: str) -> set[str]:
    """Files a module folder ships: everything except its CMakeLists, caches and Testing/."""
    folder = REPOSITORY / module_name
    return {
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file()
        and path.name != "CMakeLists.txt"
        and "__pycache__" not in path.parts
        and path.relative_to(folder).parts[0] != "Testing"
    }


def test_configure_records_the_three_modules_then_generates_config_and_package(extension_build):
    output, _ = extension_build
    assert list(recorded_modules(output)) == list(MODULE_NAMES)
    assert all(module["generic_tests"] == "TRUE" for module in recorded_modules(output).values())
    last_module = output.rindex("STUB_SLICER module=")
    assert last_module < output.index("STUB_SLICER included=GenerateConfig") < output.index("STUB_SLICER included=CPack")


@pytest.mark.parametrize("module_name", MODULE_NAMES)
def test_every_module_file_is_listed_in_its_cmakelists(extension_build, module_name):
    """Slicer packages only listed files; an unlisted file would be missing from the extension."""
    module = recorded_modules(extension_build[0])[module_name]
    listed = set(module["scripts"]) | set(module["resources"])
    assert module_files_on_disk(module_name) == listed
    assert {f"{module_name}.py", f"{module_name}Lib/__init__.py"} <= set(module["scripts"])
    assert {f"Resources/UI/{module_name}.ui", f"Resources/Icons/{module_name}.png"} <= set(module["resources"])


def test_install_puts_the_whole_medgen_package_next_to_the_modules(extension_build):
    _, scripted_modules = extension_build
    package_files = {p.relative_to(REPOSITORY).as_posix() for p in (REPOSITORY / "medgen").rglob("*.py")}
    installed = {p.relative_to(scripted_modules).as_posix() for p in (scripted_modules / "medgen").rglob("*")
                 if p.is_file()}
    assert package_files <= installed
    assert not [name for name in installed if "__pycache__" in name or name.endswith(".pyc")]


@pytest.mark.parametrize("module_name", MODULE_NAMES)
def test_install_lays_out_each_module_as_slicer_loads_it(extension_build, module_name):
    _, scripted_modules = extension_build
    for relative_path in module_files_on_disk(module_name):
        assert (scripted_modules / relative_path).is_file(), relative_path


def test_metadata_lines_match_the_extensions_index_patterns():
    """The Index CI reads these with regular expressions, so they must stay single-line and quoted."""
    text = (REPOSITORY / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"project\s*\(\s*([^\s\)\n\r]+)", text).group(1) == "MedGen"
    for name in METADATA_NAMES:
        assert re.search(rf'set\s*\(EXTENSION_{name}\s*"([^"\n]+)"\)', text), name
    icon_url = re.search(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', text).group(1)
    assert icon_url.startswith("https://raw.githubusercontent.com/") and icon_url.endswith("/main/MedGen.png")
    assert (REPOSITORY / "MedGen.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## NEXT_MODULE" in text


# The stand-in must itself catch the mistakes it exists for; these use a C-free scratch extension.

SCRATCH_TOP = """cmake_minimum_required(VERSION 3.16.3...3.19.7)
project(Scratch NONE)
{metadata}
find_package(Slicer REQUIRED)
include(${{Slicer_USE_FILE}})
slicerMacroBuildScriptedModule(NAME Scratch SCRIPTS {scripts} RESOURCES {resources})
"""


def scratch_extension(tmp_path: Path, scripts: str, resources: str = "", skip_metadata: str = "") -> Path:
    metadata = "\n".join(f'set(EXTENSION_{name} "x")' for name in METADATA_NAMES if name != skip_metadata)
    source = tmp_path / "src"
    (source / "ScratchLib").mkdir(parents=True)
    (source / "Scratch.py").write_text("")
    (source / "ScratchLib" / "__init__.py").write_text("")
    (source / "CMakeLists.txt").write_text(SCRATCH_TOP.format(metadata=metadata, scripts=scripts, resources=resources))
    return source


def test_stub_rejects_a_listed_file_that_does_not_exist(tmp_path):
    result = configure(scratch_extension(tmp_path, "Scratch.py", "Resources/UI/Missing.ui"), tmp_path / "build")
    assert result.returncode != 0
    assert "nonexistent file or directory: Resources/UI/Missing.ui" in " ".join(result.stderr.split())


def test_stub_accepts_a_script_listed_without_its_py_suffix(tmp_path):
    result = configure(scratch_extension(tmp_path, "Scratch.py ScratchLib/__init__"), tmp_path / "build")
    assert result.returncode == 0, result.stderr
    assert recorded_modules(result.stdout)["Scratch"]["scripts"] == ["Scratch.py", "ScratchLib/__init__.py"]


def test_stub_rejects_missing_extension_metadata(tmp_path):
    result = configure(scratch_extension(tmp_path, "Scratch.py", skip_metadata="ICONURL"), tmp_path / "build")
    assert result.returncode != 0
    assert "EXTENSION_ICONURL must be set" in " ".join(result.stderr.split())
