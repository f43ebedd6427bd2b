"""Plain helpers shared by the test suites (import them as ``medgen_testing``; fixtures live in conftest.py).

A module of its own because several folders have a conftest.py, so ``from conftest import`` is ambiguous.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch


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


def stored_reversed(volume, axis: int):
    """The same scan (a MetaTensor ``(C, I, J, K)``) stored with voxel ``axis`` (0-2) running the other way: the data
    flipped and the affine changed so that every voxel keeps its place in space (as an LPS NRRD of a RAS NIfTI)."""
    from monai.data import MetaTensor

    affine = torch.as_tensor(volume.affine, dtype=torch.float64).clone()
    affine[:3, 3] += affine[:3, axis] * (volume.shape[1 + axis] - 1)
    affine[:3, axis] *= -1
    return MetaTensor(volume.as_tensor().flip(1 + axis), affine=affine)


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


#: a tiny two-class MONAI UNet: the "pretrained segmentation model" of the adaptation tests
TINY_UNET_KWARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [8, 16], "strides": [2],
                    "num_res_units": 0}


def tiny_unet_spec(**overrides):
    """The model spec of :data:`TINY_UNET_KWARGS`: classes background and ``blob``, 16³ patches."""
    from medgen.models import ModelSpec, Preprocessing

    return ModelSpec(**{"network": "UNet", "kwargs": TINY_UNET_KWARGS, "class_names": ["background", "blob"],
                        "output_activation": "softmax", "name": "tiny-unet",
                        "preprocessing": Preprocessing(intensity={"method": "percentile"}, patch_size=[16, 16, 16]),
                        **overrides})


def blob_case(seed: int, affine: np.ndarray, dark: bool = True):
    """A 24³ volume with one cube "blob" (label 1): bright on dark (pretraining contrast) or, by default,
    dark on bright (the new contrast the pretrained model must be adapted to).

    Returns:
        ``(image, label)`` MetaTensors ``(1, 24, 24, 24)`` with ``affine``.
    """
    import torch
    from monai.data import MetaTensor

    generator = torch.Generator().manual_seed(seed)
    label = torch.zeros(1, 24, 24, 24, dtype=torch.int64)
    corner = torch.randint(3, 12, (3,), generator=generator)
    label[0, corner[0]:corner[0] + 8, corner[1]:corner[1] + 8, corner[2]:corner[2] + 8] = 1
    image = 0.2 + 0.6 * label.float() + 0.05 * torch.randn((1, 24, 24, 24), generator=generator)
    image = 1.0 - image if dark else image
    affine = torch.from_numpy(affine)
    return MetaTensor(image, affine=affine), MetaTensor(label, affine=affine)


def pretrained_blob_model(scratch, folder):
    """Save into ``folder`` a tiny UNet pretrained (full fine-tuning) on *bright* blobs; ``scratch`` holds
    the intermediate files. A few seconds on a CPU."""
    import torch
    from monai.networks.nets import UNet

    from medgen.adapt.finetune import FinetuneConfig, finetune_segmentation
    from medgen.models.segmentation import load_segmentation_model
    from medgen.models import save_model
    from medgen.peft import inject, merge

    torch.manual_seed(0)
    save_model(UNet(**TINY_UNET_KWARGS), tiny_unet_spec(), scratch / "random")
    model = load_segmentation_model(str(scratch / "random"))
    inject(model.network, "full")
    cases = [blob_case(seed, oblique_affine(), dark=False) for seed in range(4)]
    config = FinetuneConfig(steps=40, val_every=20, lr=1e-2, amp=False)
    finetune_segmentation(model, cases, config, checkpoint_dir=scratch / "ckpt")
    save_model(merge(model.network), tiny_unet_spec(), folder)
    return folder


def verify_nnunet_dataset(dataset_dir) -> None:
    """Run nnU-Net v2's own ``verify_dataset_integrity`` on ``dataset_dir`` in a fresh Python process.

    In-process, its multiprocessing pool starts from a pytest process that holds torch's thread pools, and a
    CI run hung there once; a fresh interpreter has no threads to inherit and a timeout turns a hang into a failure.
    """
    import subprocess
    import sys

    pytest.importorskip("nnunetv2.experiment_planning.verify_dataset_integrity")
    code = ("import sys; from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity; "
            "verify_dataset_integrity(sys.argv[1], num_processes=1)")
    checked = subprocess.run([sys.executable, "-c", code, str(dataset_dir)], capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0, f"nnU-Net's integrity check failed:\n{checked.stdout[-2000:]}\n{checked.stderr[-2000:]}"


def scene_snapshot(scene) -> list[tuple[str, str]]:
    """Sorted (ID, name) of every node in ``scene``: equal snapshots = an unchanged scene."""
    return sorted((scene.GetNthNode(i).GetID(), scene.GetNthNode(i).GetName()) for i in range(scene.GetNumberOfNodes()))


def cancel_once_running(job, started=lambda event: event["event"] == "progress") -> None:
    """Wait until a started :class:`medgen.slicer.scene_job.SceneJob` emits an event matching ``started``
    (default: its first progress event), then cancel it."""
    import time

    while job.poll() and not any(started(event) for event in job.runner.events):
        time.sleep(0.05)
    job.cancel()
