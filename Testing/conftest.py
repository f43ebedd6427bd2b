"""Shared pytest setup: deterministic CPU torch, tiny sample volumes, a real MRML scene (slicer-core)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from medgen_testing import make_mrml_scene, oblique_affine

os.environ.setdefault("OMP_NUM_THREADS", "2")
# every test, and every module-scoped fixture built before the first test's seeding, on the same thread count:
# float reductions differ between thread counts, and tests compare trained weights bit for bit
torch.set_num_threads(2)
if not torch.cuda.is_available():
    # the fused LMI kernel is tested on the CPU under Triton's interpreter, which must be chosen
    # before triton is first imported (its standard library is compiled at import)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer integration checks (2-process DDP, real workers into real MRML; -m 'not slow' leaves them out)")


@pytest.fixture(autouse=True)
def _seeded_torch():
    import torch

    torch.manual_seed(0)
    np.random.seed(0)
    torch.set_num_threads(2)
    yield


@pytest.fixture
def oblique():
    return oblique_affine()


@pytest.fixture
def mrml_scene():
    """A real MRML scene with the Colors, Segmentations, Volumes and SubjectHierarchy logics (slicer-core).

    Also sets ``slicer.mrmlScene``/``slicer.modules`` the way the Slicer app does, and restores them after.
    """
    yield from make_mrml_scene()
