"""The versions pyproject.toml admits are the versions scripts/test_lower_bounds.sh tests."""

from __future__ import annotations

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from slicer_stubs import REPOSITORY


def _lower_bound(requirement: Requirement) -> Version:
    (bound,) = [spec.version for spec in requirement.specifier if spec.operator == ">="]
    return Version(bound)


def test_every_dependency_is_pinned_at_its_lower_bound_for_the_lower_bound_run():
    """A raised or added lower bound in pyproject.toml must reach scripts/lower-bounds.txt, or the lower-bound run
    would test versions that pip can no longer install with MedGen (or miss the new oldest one)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    declared = [Requirement(line) for line in tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]["dependencies"]]
    lines = (REPOSITORY / "scripts" / "lower-bounds.txt").read_text().splitlines()
    pins = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    pinned = {pin.name.lower(): Version(next(iter(pin.specifier)).version) for pin in pins}
    assert pinned == {requirement.name.lower(): _lower_bound(requirement) for requirement in declared}
