"""Sample anatomy with no download at run time.

The ICBM152 2009 T1 template and its grey/white-matter probability maps ship inside the ``nilearn``
wheel; they are found on disk without importing nilearn (which would pull in scikit-learn). From
them we derive a brain mask, a CSF map, a 3-class tissue label map and *simulated* T2-/PD-like
contrasts (weighted sums of tissue probabilities with noise and a smooth bias field). The simulated
contrasts are not acquisitions: they give a second modality with voxel-exact ground truth.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import ResizeWithPadOrCrop, Spacing

from medgen.errors import BadInputError
from medgen.io import load_volume, save_volume
from medgen.io.atomic import write_text_atomic
from medgen.labels import LabelInfo, save_labels

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

#: size name -> (isotropic spacing in mm, fixed output shape or None)
SIZES: dict[str, tuple[float, tuple[int, int, int] | None]] = {
    "full": (1.0, None),
    "reduced": (2.0, None),
    "small": (4.0, (48, 56, 48)),
    "tiny": (6.0, (32, 32, 32)),
}

TISSUE_LABELS = [
    LabelInfo("CSF", 1, (0.35, 0.6, 0.95)),
    LabelInfo("grey matter", 2, (0.85, 0.45, 0.35)),
    LabelInfo("white matter", 3, (0.95, 0.95, 0.8)),
]

#: relative signal of (CSF, GM, WM) in the simulated contrasts
SIMULATED_CONTRASTS = {"t2_simulated": (1.0, 0.55, 0.35), "pd_simulated": (0.95, 0.85, 0.70)}
BRAIN_THRESHOLD = 0.05


@dataclasses.dataclass
class SampleCase:
    """One subject on one voxel grid; every volume is a MetaTensor ``(1, I, J, K)`` with the same RAS affine.

    Attributes:
        t1: real T1 template intensities in [0, 1].
        t2_simulated, pd_simulated: simulated contrasts in [0, 1].
        tissue_labels: int64 label map (0 background, 1 CSF, 2 GM, 3 WM); names in ``labels``.
        brain_mask: int64 0/1 mask.
    """

    t1: MetaTensor
    t2_simulated: MetaTensor
    pd_simulated: MetaTensor
    tissue_labels: MetaTensor
    brain_mask: MetaTensor
    labels: list[LabelInfo] = dataclasses.field(default_factory=lambda: list(TISSUE_LABELS))

    IMAGES = ("t1", "t2_simulated", "pd_simulated")
    LABEL_MAPS = ("tissue_labels", "brain_mask")


def template_files() -> dict[str, Path]:
    """Paths of the MNI152 T1/GM/WM files inside the installed nilearn package."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise BadInputError("Sample data needs the 'nilearn' package (it ships the MNI152 template): pip install nilearn")
    data_dir = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    paths = {name: data_dir / file_name for name, file_name in TEMPLATE_FILES.items()}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise BadInputError(f"The installed nilearn lacks the MNI152 files {missing}; reinstall nilearn>=0.10.")
    return paths


def _resample(volume: MetaTensor, size: str) -> MetaTensor:
    spacing_mm, shape = SIZES[size]
    if spacing_mm != 1.0:
        volume = Spacing(pixdim=(spacing_mm,) * 3, mode="bilinear")(volume)
    if shape is not None:
        volume = ResizeWithPadOrCrop(shape)(volume)
    return volume


def _smooth_bias_field(shape: tuple[int, ...], generator: torch.Generator, amplitude: float = 0.1) -> torch.Tensor:
    """Multiplicative field 1 ± ``amplitude`` varying over ~1/4 of the volume (upsampled 4³ noise)."""
    coarse = torch.rand((1, 1, 4, 4, 4), generator=generator) * 2 - 1
    field = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0]
    return 1.0 + amplitude * field


@functools.lru_cache(maxsize=len(SIZES))
def _template_maps(size: str) -> dict[str, MetaTensor]:
    """The T1, GM and WM templates in [0, 1] on the grid of ``size``: read once per size and process (reading the
    1 mm files is 0.47 s of a 0.5 s tiny case; the demo builds 13 cases). Callers use clamped copies only."""
    return {name: _resample(load_volume(path) / 255.0, size) for name, path in template_files().items()}


def load_sample_case(size: str = "reduced", seed: int = 0, noise_std: float = 0.02) -> SampleCase:
    """Build the sample subject at one of :data:`SIZES` (``full`` 1 mm, ``reduced`` 2 mm, ``small``, ``tiny`` 32³).

    Args:
        size: grid name.
        seed: seed of the simulated contrasts' noise and bias field.
        noise_std: Gaussian noise of the simulated contrasts (fraction of full scale).
    """
    if size not in SIZES:
        raise BadInputError(f"Unknown sample size {size!r}; choose one of {', '.join(SIZES)}.")
    maps = _template_maps(size)
    t1, gm, wm = (maps[name].clamp(0, 1) for name in ("t1", "gm", "wm"))
    affine = t1.affine.clone()  # each case its own: the cached maps' affine must never be changed through a case
    brain = t1 > BRAIN_THRESHOLD
    csf = (brain.float() - gm - wm).clamp(0, 1) * brain
    tissues = torch.cat([csf, gm, wm], dim=0)  # (3, I, J, K)
    labels = (tissues.argmax(dim=0, keepdim=True) + 1) * brain
    generator = torch.Generator().manual_seed(seed)
    bias = _smooth_bias_field(tuple(t1.shape[1:]), generator)
    simulated = {}
    for name, weights in SIMULATED_CONTRASTS.items():
        signal = (torch.tensor(weights).view(3, 1, 1, 1) * tissues).sum(0, keepdim=True)
        noisy = signal * bias + noise_std * torch.randn(signal.shape, generator=generator)
        simulated[name] = MetaTensor((noisy * brain).clamp(0, 1).as_tensor(), affine=affine)
    return SampleCase(
        t1=MetaTensor(t1.as_tensor(), affine=affine),
        t2_simulated=simulated["t2_simulated"],
        pd_simulated=simulated["pd_simulated"],
        tissue_labels=MetaTensor(labels.as_tensor().long(), affine=affine),
        brain_mask=MetaTensor(brain.as_tensor().long(), affine=affine),
    )


def with_simulated_head(image: MetaTensor, brain_mask: MetaTensor, *, scalp_intensity: float = 0.9, gap_mm: float = 4.0,
                        thickness_mm: float = 6.0, noise_std: float = 0.03, seed: int = 0) -> MetaTensor:
    """``image`` plus a SIMULATED scalp: a shell ``gap_mm`` outside the brain, ``thickness_mm`` thick, with
    bright fat-like signal, and background noise everywhere, so brain extraction is not a threshold.

    Args:
        image, brain_mask: ``(1, I, J, K)`` on one grid (the mask 0/1).
        scalp_intensity: shell signal in the image's [0, 1] range.
    """
    from scipy.ndimage import distance_transform_edt

    spacing = np.linalg.norm(np.asarray(image.affine)[:3, :3], axis=0)
    distance_mm = distance_transform_edt(brain_mask[0].numpy() == 0, sampling=spacing)
    shell = torch.from_numpy(((distance_mm > gap_mm) & (distance_mm <= gap_mm + thickness_mm)).astype(np.float32))[None]
    generator = torch.Generator().manual_seed(seed)
    noisy = image.as_tensor() + scalp_intensity * shell + noise_std * torch.randn(image.shape, generator=generator).abs()
    return MetaTensor(noisy.clamp(0, 1), affine=image.affine)


def write_sample_case(case: SampleCase, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write every volume of ``case`` as NIfTI plus ``labels.json`` and a README; returns name -> path."""
    out_dir = Path(out_dir)
    paths = {name: save_volume(getattr(case, name), out_dir / f"{name}.nii.gz") for name in SampleCase.IMAGES}
    for name in SampleCase.LABEL_MAPS:
        paths[name] = save_volume(getattr(case, name), out_dir / f"{name}.nii.gz", label=True)
    paths["labels"] = save_labels(case.labels, out_dir / "labels.json")
    write_text_atomic(
        out_dir / "README.txt",
        "MedGen sample subject (no download needed).\n"
        "t1: ICBM152 2009 T1 template as shipped in the nilearn package (real anatomy, an average of many scans).\n"
        "tissue_labels: argmax of CSF/grey/white-matter probabilities derived from the template (labels.json).\n"
        "t2_simulated, pd_simulated: SIMULATED contrasts computed from the tissue maps; not real acquisitions.\n"
        + json.dumps({"grid_shape": list(case.t1.shape[1:])}) + "\n",
    )
    return paths
