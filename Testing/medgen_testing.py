"""Plain helpers shared by the test suites (import them as ``medgen_testing``; fixtures live in conftest.py).

A module of its own because several folders have a conftest.py, so ``from conftest import`` is ambiguous.
"""

from __future__ import annotations

import types

import numpy as np
import pytest


def oblique_affine(spacing=(0.8, 0.9, 2.5), origin=(-10.0, 20.0, 30.0), angles_deg=(10.0, 20.0, 30.0)) -> np.ndarray:
    """A 4x4 IJK-to-RAS matrix with a rotated (oblique) direction, anisotropic spacing and offset origin."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rx @ ry @ rz @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def make_mrml_scene():
    """The body of :func:`mrml_scene`, for fixtures of a wider scope (``yield from make_mrml_scene()``)."""
    slicer = pytest.importorskip("slicer")
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    color_logic = app_logic.GetColorLogic()
    color_logic.SetMRMLScene(scene)
    color_logic.AddDefaultColorNodes()
    app_logic.SetModuleLogic("Colors", color_logic)
    logics = {}
    for name, logic_class in (
        ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
        ("Volumes", slicer.vtkSlicerVolumesLogic),
        ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
    ):
        logic = logic_class()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic(name, logic)
        logics[name.lower()] = logic
    saved = {key: getattr(slicer, key, None) for key in ("mrmlScene", "modules")}
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(
        **{key: types.SimpleNamespace(logic=(lambda logic=logic: logic)) for key, logic in logics.items()}
    )
    scene.medgen_app_logic = app_logic  # keep the application logic alive with the scene
    yield scene
    for key, value in saved.items():
        setattr(slicer, key, value)
    scene.Clear(1)
