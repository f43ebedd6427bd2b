"""medgen.slicer.dependencies asks before installing, never pins exactly, never touches Slicer's own packages."""

from __future__ import annotations

import sys
import types

import pytest
import slicer
import slicer.util

from medgen.slicer import dependencies
from medgen.slicer.dependencies import DependencyError
from slicer_stubs import MODULE_NAMES, REPOSITORY

ABSENT_REQUIREMENT = "medgen-test-absent-package>=1.0"


class Recorder:
    """Records calls as (name, args, kwargs) and returns a scripted value."""

    def __init__(self, calls: list, name: str, returns=None, raises: Exception | None = None):
        self.calls, self.name, self.returns, self.raises = calls, name, returns, raises

    def __call__(self, *args, **kwargs):
        self.calls.append((self.name, args, kwargs))
        if self.raises is not None:
            raise self.raises
        return self.returns


@pytest.fixture
def calls():
    return []


@pytest.fixture
def fake_pytorch_utils(monkeypatch, calls):
    """A PyTorch extension whose torch is not installed yet and whose installer succeeds."""
    logic = types.SimpleNamespace(
        torchInstalled=Recorder(calls, "torchInstalled", returns=False),
        installTorch=Recorder(calls, "installTorch", returns=types.ModuleType("torch")),
    )
    module = types.SimpleNamespace(PyTorchUtilsLogic=lambda: logic)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", module)
    return logic


@pytest.fixture
def fake_packaging(monkeypatch, calls):
    """Slicer >= 5.12: ``slicer.packaging.pip_ensure`` exists."""
    packaging = types.SimpleNamespace(pip_ensure=Recorder(calls, "pip_ensure"))
    monkeypatch.setattr(slicer, "packaging", packaging, raising=False)
    return packaging


def requirements_file(tmp_path, *lines: str):
    path = tmp_path / "requirements.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("module_name", MODULE_NAMES)
def test_module_requirement_files_are_safe(module_name):
    path = REPOSITORY / module_name / "Resources" / f"{module_name}-requirements.txt"
    names = {requirement.name.lower() for requirement in dependencies.read_requirements(path)}
    assert "monai" in names
    assert not names & {"torch", "numpy", "simpleitk", "vtk"}
    assert "==" not in path.read_text()


@pytest.mark.parametrize("line", ["numpy>=1.26", "SimpleITK~=2.4", "vtk", "torch>=2.4", "monai==1.6.1"])
def test_unsafe_requirement_lines_are_refused(tmp_path, line):
    with pytest.raises(DependencyError):
        dependencies.read_requirements(requirements_file(tmp_path, "# comment", "-c constraints.txt", line))


def test_torch_comes_from_the_pytorch_extension_with_confirmation(fake_pytorch_utils, calls):
    dependencies.ensure_torch()
    assert calls[-1] == ("installTorch", (), {"askConfirmation": True, "torchVersionRequirement": ">=2.8"})


def test_declined_torch_install_raises(fake_pytorch_utils):
    fake_pytorch_utils.installTorch.returns = None
    with pytest.raises(DependencyError, match="PyTorch"):
        dependencies.ensure_torch()


def test_installed_torch_is_left_alone(fake_pytorch_utils, calls):
    fake_pytorch_utils.torchInstalled.returns = True
    dependencies.ensure_torch()
    assert [name for name, _, _ in calls] == ["torchInstalled"]


def test_an_installed_torch_too_old_for_monai_is_refused_before_pip_could_replace_it(fake_pytorch_utils, monkeypatch):
    fake_pytorch_utils.torchInstalled.returns = True
    real_version = dependencies.importlib.metadata.version
    monkeypatch.setattr(dependencies.importlib.metadata, "version",
                        lambda name: "2.4.1+cu121" if name == "torch" else real_version(name))
    with pytest.raises(DependencyError, match=r"PyTorch 2.4.1\+cu121 is installed; MedGen needs torch>=2.8 .*PyTorch Utils"):
        dependencies.ensure_torch()


def test_missing_packages_go_through_pip_ensure_with_the_requester(tmp_path, fake_pytorch_utils, fake_packaging, calls):
    path = requirements_file(tmp_path, "monai~=1.6", ABSENT_REQUIREMENT)
    restart_needed = dependencies.ensure_dependencies(path, requester="TenVOOSlicer")
    pip_calls = [call for call in calls if call[0] == "pip_ensure"]
    # monai is installed here at 1.6.x, so only the absent package is requested.
    assert pip_calls == [("pip_ensure", ([ABSENT_REQUIREMENT],), {"requester": "TenVOOSlicer"})]
    assert restart_needed is False


def test_nothing_is_installed_when_everything_is_satisfied(tmp_path, fake_packaging, calls):
    assert dependencies.ensure_requirements(dependencies.read_requirements(
        requirements_file(tmp_path, "monai~=1.6", "nibabel>=5.0")), requester="X") is False
    assert calls == []


def test_upgrading_an_imported_package_asks_for_a_restart(tmp_path, fake_packaging, calls):
    import nibabel  # noqa: F401  (loaded, so a new version only takes effect after a restart)

    requirements = dependencies.read_requirements(requirements_file(tmp_path, "nibabel>=999"))
    assert dependencies.ensure_requirements(requirements, requester="X") is True
    assert calls == [("pip_ensure", (["nibabel>=999"],), {"requester": "X"})]


def test_declining_pip_ensure_raises(tmp_path, fake_packaging):
    fake_packaging.pip_ensure.raises = RuntimeError("declined")
    with pytest.raises(DependencyError, match="cannot run without"):
        dependencies.ensure_requirements(
            dependencies.read_requirements(requirements_file(tmp_path, ABSENT_REQUIREMENT)), requester="X")


def test_slicer_5_10_confirms_then_uses_pip_install(tmp_path, monkeypatch, calls):
    monkeypatch.delattr(slicer, "packaging", raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", Recorder(calls, "confirm", returns=True), raising=False)
    monkeypatch.setattr(slicer.util, "pip_install", Recorder(calls, "pip_install"), raising=False)
    requirements = dependencies.read_requirements(requirements_file(tmp_path, ABSENT_REQUIREMENT))
    dependencies.ensure_requirements(requirements, requester="X")
    assert [name for name, _, _ in calls] == ["confirm", "pip_install"]
    assert ABSENT_REQUIREMENT in calls[0][1][0]
    assert calls[1][1] == ([ABSENT_REQUIREMENT],)


def test_slicer_5_10_declined_confirmation_installs_nothing(tmp_path, monkeypatch, calls):
    monkeypatch.delattr(slicer, "packaging", raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", Recorder(calls, "confirm", returns=False), raising=False)
    monkeypatch.setattr(slicer.util, "pip_install", Recorder(calls, "pip_install"), raising=False)
    requirements = dependencies.read_requirements(requirements_file(tmp_path, ABSENT_REQUIREMENT))
    with pytest.raises(DependencyError):
        dependencies.ensure_requirements(requirements, requester="X")
    assert [name for name, _, _ in calls] == ["confirm"]


def test_torch_report_describes_this_machine():
    import torch

    report = dependencies.torch_report()
    assert report["installed"] and report["version"] == torch.__version__
    assert report["device"] == ("cpu" if not report["cuda_available"] else torch.cuda.get_device_name(0))
    assert dependencies.format_torch_report(report).startswith(f"PyTorch {torch.__version__} | CUDA: ")
    assert "not installed" in dependencies.format_torch_report({"installed": False})


@pytest.mark.parametrize("module_name", MODULE_NAMES)
def test_module_requirements_cover_the_library_dependencies(module_name):
    """What pyproject says medgen needs must be installable in Slicer's Python with the same version ranges (the
    suite runs at pyproject's lower bounds; torch/numpy/SimpleITK come with Slicer or the PyTorch extension, whose
    installer is asked for pyproject's torch range; HF peft only where adapters are trained)."""
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    declared = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]["dependencies"]
    ranges = {requirement.name.lower(): requirement.specifier for requirement in map(Requirement, declared)}
    assert str(ranges["torch"]) == dependencies.TORCH_REQUIREMENT
    needed = set(ranges) - {"torch", "numpy", "simpleitk"}
    if module_name != "TenVOOSlicer":
        needed -= {"peft"}
    path = REPOSITORY / module_name / "Resources" / f"{module_name}-requirements.txt"
    listed = {requirement.name.lower(): requirement.specifier for requirement in dependencies.read_requirements(path)}
    assert needed <= set(listed), sorted(needed - set(listed))
    assert {name: listed[name] for name in needed} == {name: ranges[name] for name in needed}


def test_no_deps_requirements_are_confirmed_then_installed_with_no_deps(tmp_path, monkeypatch, fake_pytorch_utils,
                                                                       fake_packaging, calls):
    import shlex

    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", Recorder(calls, "confirm", returns=True), raising=False)
    monkeypatch.setattr(slicer.util, "pip_install", Recorder(calls, "pip_install"), raising=False)
    path = requirements_file(tmp_path, "monai~=1.6")
    (tmp_path / "requirements-nodeps.txt").write_text(f"# weights only\n{ABSENT_REQUIREMENT}\nnibabel>=5.0\n")
    assert dependencies.no_deps_requirements_file(path) == tmp_path / "requirements-nodeps.txt"
    assert dependencies.ensure_dependencies(path, requester="TenVOOSlicer") is False
    install_calls = [call for call in calls if call[0] in ("confirm", "pip_install", "pip_ensure")]
    assert [name for name, _, _ in install_calls] == ["confirm", "pip_install"]  # monai and nibabel are installed here
    question = install_calls[0][1][0]
    assert "without their dependencies" in question and ABSENT_REQUIREMENT in question and "nibabel" not in question
    assert install_calls[1][1] == ("--no-deps 'medgen-test-absent-package>=1.0'",)
    assert shlex.split(install_calls[1][1][0]) == ["--no-deps", ABSENT_REQUIREMENT]


def test_declined_no_deps_install_raises_and_installs_nothing(tmp_path, monkeypatch, calls):
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", Recorder(calls, "confirm", returns=False), raising=False)
    monkeypatch.setattr(slicer.util, "pip_install", Recorder(calls, "pip_install"), raising=False)
    requirements = dependencies.read_requirements(requirements_file(tmp_path, ABSENT_REQUIREMENT))
    with pytest.raises(DependencyError, match="cannot run without: medgen-test-absent-package>=1.0"):
        dependencies.ensure_requirements(requirements, requester="X", no_deps=True)
    assert [name for name, _, _ in calls] == ["confirm"]


@pytest.mark.parametrize("module_name", ["TenVOOSlicer", "MedGenSynthesis", "CrossModalTranslate"])
def test_no_deps_requirements_are_data_only_packages_kept_out_of_the_main_file(module_name):
    """deepbet (brain-extraction weights, TenVOOSlicer) and nilearn (the sample subject's template, every module)
    contribute files only; their declared dependencies would pull a second torch or scikit-learn and pandas."""
    path = REPOSITORY / module_name / "Resources" / f"{module_name}-requirements.txt"
    no_deps = dependencies.read_requirements(dependencies.no_deps_requirements_file(path))
    expected = ["deepbet", "nilearn"] if module_name == "TenVOOSlicer" else ["nilearn"]
    assert [requirement.name for requirement in no_deps] == expected
    assert not set(expected) & {requirement.name for requirement in dependencies.read_requirements(path)}
    cmake = (REPOSITORY / module_name / "CMakeLists.txt").read_text()
    assert "Resources/${MODULE_NAME}-requirements-nodeps.txt" in cmake  # installed next to the main file
