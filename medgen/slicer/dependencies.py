"""Install MedGen's Python dependencies inside 3D Slicer, always after asking the user.

PyTorch comes from the PyTorch extension's installer (it picks the wheel that fits the GPU driver);
every other package comes from the module's ``Resources/<Module>-requirements.txt`` through Slicer's
pip helpers: ``slicer.packaging.pip_ensure`` on Slicer >= 5.12, ``slicer.util.pip_install`` after a
confirmation dialog on 5.10. Packages that Slicer itself ships (numpy, SimpleITK, vtk) are never
requested: replacing them breaks Slicer.

Packages listed in the sibling ``<Module>-requirements-nodeps.txt`` are installed with ``pip install
--no-deps``, after their own confirmation: deepbet, for one, only contributes the weight files in its
wheel, while its declared dependencies would pull a second torch next to the PyTorch extension's.

``slicer`` and ``torch`` are imported inside the functions, so this module imports in plain Python
and nothing is installed at import time.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import shlex
import sys
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from medgen.errors import MedGenError

#: the torch versions MedGen's library is written for (MONAI 1.6 needs torch >= 2.8); the same as pyproject.toml's
TORCH_REQUIREMENT = ">=2.8"

#: distributions a requirements file must not list: Slicer ships numpy, SimpleITK and vtk (replacing
#: them breaks Slicer), and torch must come from the PyTorch extension's installer
UNREQUESTABLE_PACKAGES = frozenset({"numpy", "simpleitk", "vtk", "torch"})

#: suffix of the requirements file whose packages are installed without their dependencies
NO_DEPS_SUFFIX = "-nodeps"


class DependencyError(MedGenError):
    """A dependency is missing and was not installed (the user declined, or installation failed)."""

    kind = "bad_input"


def read_requirements(path: str | Path) -> list[Requirement]:
    """Parse a requirements file and refuse lines that could damage Slicer's Python.

    Comment lines, blank lines and pip options (lines starting with ``-``) are skipped, as
    Slicer's own loader does.

    Raises:
        DependencyError: for an exact ``==`` pin (it fights other extensions' pins) or a package
            that Slicer owns (numpy, SimpleITK, vtk) or that comes from the PyTorch extension (torch).
    """
    requirements = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "-")):
            continue
        requirement = Requirement(line)
        if requirement.name.lower() in UNREQUESTABLE_PACKAGES:
            raise DependencyError(
                f"{path}: {requirement.name!r} must not be listed; Slicer or the PyTorch extension provides it."
            )
        if any(spec.operator in ("==", "===") for spec in requirement.specifier):
            raise DependencyError(f"{path}: {line!r} pins an exact version; use '~=' or '>=' instead of '=='.")
        requirements.append(requirement)
    return requirements


def missing_requirements(requirements: list[Requirement]) -> list[Requirement]:
    """The requirements whose distribution is absent or installed at a version outside the specifier."""
    missing = []
    for requirement in requirements:
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(requirement)
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            missing.append(requirement)
    return missing


def _imported_already(requirement: Requirement) -> bool:
    """True when a module of this distribution is loaded, so a new version needs a restart."""
    import_names = {requirement.name.replace("-", "_").lower()}
    for import_name, distributions in importlib.metadata.packages_distributions().items():
        if any(name.lower() == requirement.name.lower() for name in distributions):
            import_names.add(import_name.lower())
    return any(name in sys.modules for name in import_names)


def ensure_torch() -> None:
    """Make sure torch is importable, installing it through the PyTorch extension after confirmation.

    Raises:
        DependencyError: when the PyTorch extension is missing or the user declined the install.
    """
    try:
        import PyTorchUtils
    except ImportError as error:
        raise DependencyError(
            "The PyTorch extension is not installed. Install 'PyTorch' from the Extensions Manager and restart Slicer."
        ) from error
    torch_logic = PyTorchUtils.PyTorchUtilsLogic()
    if torch_logic.torchInstalled():
        # an older torch would let pip replace the extension's build (a CUDA one) when MONAI asks for a newer one
        installed = importlib.metadata.version("torch")
        if not SpecifierSet(TORCH_REQUIREMENT).contains(installed, prereleases=True):
            raise DependencyError(
                f"PyTorch {installed} is installed; MedGen needs torch{TORCH_REQUIREMENT} (MONAI 1.6 needs it). Update "
                "it in the PyTorch Utils module, which keeps the build for your GPU, then restart Slicer."
            )
        return
    torch = torch_logic.installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT)
    if torch is None:
        raise DependencyError(
            "PyTorch was not installed. Use the PyTorch Utils module to install it, then try again."
        )


def no_deps_requirements_file(requirements_file: str | Path) -> Path:
    """``<Module>-requirements-nodeps.txt`` next to ``<Module>-requirements.txt`` (it may not exist)."""
    path = Path(requirements_file)
    return path.with_name(f"{path.stem}{NO_DEPS_SUFFIX}{path.suffix}")


def ensure_requirements(requirements: list[Requirement], requester: str, no_deps: bool = False) -> bool:
    """Install the missing ``requirements`` after asking the user; return True when a restart is needed.

    Args:
        requirements: parsed with :func:`read_requirements`.
        requester: the module name shown in Slicer's confirmation dialog.
        no_deps: install with ``pip install --no-deps`` (always through ``slicer.util.pip_install`` after
            our own confirmation, since ``pip_ensure`` resolves dependencies).

    Raises:
        DependencyError: when the user declined.
    """
    import slicer
    import slicer.util

    missing = missing_requirements(requirements)
    if not missing:
        return False
    restart_needed = any(_imported_already(requirement) for requirement in missing)
    missing_text = [str(requirement) for requirement in missing]
    if no_deps:
        question = (f"{requester} needs these Python packages, installed without their dependencies "
                    "(those would replace Slicer's PyTorch):\n\n" + "\n".join(missing_text) + "\n\nInstall them now?")
        if not slicer.util.confirmOkCancelDisplay(question, "Install Python packages"):
            raise DependencyError(f"{requester} cannot run without: {', '.join(missing_text)}.")
        # One string of pip arguments (pip_install splits it like a shell), which every Slicer version accepts.
        slicer.util.pip_install(shlex.join(["--no-deps", *missing_text]))
        return restart_needed
    packaging = getattr(slicer, "packaging", None)
    if packaging is None:
        # Slicer 5.10 has no slicer.packaging: ask ourselves, then use the plain pip wrapper.
        question = f"{requester} needs these Python packages:\n\n" + "\n".join(missing_text) + "\n\nInstall them now?"
        if not slicer.util.confirmOkCancelDisplay(question, "Install Python packages"):
            raise DependencyError(f"{requester} cannot run without: {', '.join(missing_text)}.")
        slicer.util.pip_install(missing_text)
        return restart_needed
    try:
        packaging.pip_ensure(missing_text, requester=requester)
    except RuntimeError as error:  # pip_ensure's way of saying "the user declined"
        raise DependencyError(f"{requester} cannot run without: {', '.join(missing_text)}.") from error
    return restart_needed


def ensure_dependencies(requirements_file: str | Path, requester: str) -> bool:
    """Ensure torch, the module's requirements and its ``--no-deps`` ones (see :func:`no_deps_requirements_file`),
    in that order; return True when Slicer should restart."""
    ensure_torch()
    restart_needed = ensure_requirements(read_requirements(requirements_file), requester)
    no_deps_file = no_deps_requirements_file(requirements_file)
    if no_deps_file.is_file():
        restart_needed |= ensure_requirements(read_requirements(no_deps_file), requester, no_deps=True)
    return restart_needed


def torch_report() -> dict[str, Any]:
    """What the Setup section shows: whether torch imports, its version, CUDA availability and device.

    Returns:
        ``{"installed": bool, "version": str | None, "cuda_available": bool, "device": str}``;
        ``device`` is the GPU name when CUDA is usable, else ``"cpu"``.
    """
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        return {"installed": False, "version": None, "cuda_available": False, "device": "none"}
    cuda_available = bool(torch.backends.cuda.is_built() and torch.cuda.is_available())
    device = torch.cuda.get_device_name(0) if cuda_available else "cpu"
    return {"installed": True, "version": torch.__version__, "cuda_available": cuda_available, "device": device}


def format_torch_report(report: dict[str, Any]) -> str:
    """One line for the Setup status label, e.g. ``PyTorch 2.13.0 | CUDA: no | device: cpu``."""
    if not report["installed"]:
        return "PyTorch is not installed: press 'Install dependencies'."
    cuda = "yes" if report["cuda_available"] else "no"
    return f"PyTorch {report['version']} | CUDA: {cuda} | device: {report['device']}"
