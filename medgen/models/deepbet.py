"""deepbet's pretrained brain-extraction networks as eager modules, and deepbet's input preprocessing.

The ``deepbet`` wheel (1.0.2, MIT) ships two TorchScript LinkNet3d archives in
``site-packages/data/models/``: ``bbox_model.pt`` (whole head resized to 128³, used to find the brain's
bounding box) and ``model.pt`` (the bounding-box crop, with a 10 % margin, resized to 256³). The first
:func:`load_deepbet` converts the chosen archive once into a MedGen model folder (spec + safetensors)
in the cache, reading the archive's tensors without loading its TorchScript code; later calls read
only the safetensors file.

deepbet's preprocessing (``deepbet/bet.py::run_model`` and ``utils.py::normalize``): reorient to the
closest canonical (RAS) orientation, replace NaN by 0, resize with ``nearest-exact`` interpolation to
the network size regardless of voxel spacing, take the 0.5 % and 99.5 % quantiles of the 128³ resized
whole volume, clip to them and scale to [0, 1], z-score, then ``0.226 * x + 0.449``. The output has
two softmax channels; channel 1 > 0.5 is brain.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medgen.errors import BadInputError, ModelError
from medgen.models.cache import medgen_cache_dir
from medgen.models.spec import ModelSpec, Preprocessing
from medgen.models.linknet3d import LinkNet3d
from medgen.models.store import load_model, save_model
from medgen.models.torchscript_weights import read_torchscript_tensors
from medgen.models.weights import load_state_dict_checked

DEEPBET_VERSION = "1.0.2"
#: which -> (archive name in the wheel, network input size in voxels)
DEEPBET_NETWORKS = {"bbox": ("bbox_model.pt", (128, 128, 128)), "full": ("model.pt", (256, 256, 256))}
#: deepbet scales its z-scored input to the ImageNet mean/std of one channel
_LOWER_QUANTILE, _UPPER_QUANTILE, _SCALE, _SHIFT = 0.005, 0.995, 0.226, 0.449
_RANGE_SIZE = DEEPBET_NETWORKS["bbox"][1]


def _check_which(which: str) -> tuple[str, tuple[int, int, int]]:
    if which not in DEEPBET_NETWORKS:
        raise BadInputError(f"Unknown deepbet network {which!r}: use one of {sorted(DEEPBET_NETWORKS)}.")
    return DEEPBET_NETWORKS[which]


def deepbet_archive_path(which: str = "bbox") -> Path:
    """Path of the TorchScript archive the installed deepbet wheel ships.

    Raises:
        ModelError: deepbet is not installed, or its wheel lacks the archive.
    """
    archive_name, _ = _check_which(which)
    try:
        distribution = metadata.distribution("deepbet")
    except metadata.PackageNotFoundError as error:
        raise ModelError(
            "deepbet is not installed, so its pretrained weights are not available: "
            f"pip install deepbet=={DEEPBET_VERSION}"
        ) from error
    for file in distribution.files or []:
        if file.as_posix().endswith(f"data/models/{archive_name}"):
            return Path(distribution.locate_file(file)).resolve()
    raise ModelError(
        f"deepbet {distribution.version} is installed but its wheel has no data/models/{archive_name}; "
        f"reinstall deepbet=={DEEPBET_VERSION}."
    )


def deepbet_spec(which: str = "bbox") -> ModelSpec:
    """The model spec of deepbet's ``bbox`` (128³) or ``full`` (256³) network."""
    archive_name, input_size = _check_which(which)
    return ModelSpec(
        network="LinkNet3d",
        kwargs={"in_channels": 1, "out_channels": 2, "widths": [16, 32, 64, 128], "softmax": True},
        in_channels=1,
        out_channels=2,
        class_names=["background", "brain"],
        output_activation="softmax",
        preprocessing=Preprocessing(
            intensity={
                "method": "deepbet",
                "lower_quantile": _LOWER_QUANTILE,
                "upper_quantile": _UPPER_QUANTILE,
                "scale": _SCALE,
                "shift": _SHIFT,
            },
            spacing_mm=None,
            patch_size=list(input_size),
            orientation="RAS",
        ),
        name=f"deepbet-{which}",
        description=f"deepbet {DEEPBET_VERSION} brain extraction ({which}: {input_size[0]}³ input), MIT licence",
        provenance={"source": f"deepbet=={DEEPBET_VERSION}", "archive": archive_name, "licence": "MIT"},
    )


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _convert_archive(archive_path: Path, spec: ModelSpec, folder: Path) -> None:
    network = LinkNet3d(**spec.kwargs)
    load_state_dict_checked(network, read_torchscript_tensors(archive_path), source=str(archive_path))
    save_model(network, spec, folder)


def load_deepbet(which: str = "bbox", cache_dir: str | Path | None = None) -> nn.Module:
    """deepbet's pretrained LinkNet3d as an eager module (CPU, eval mode), ready for adapters.

    Args:
        which: ``"bbox"`` (128³ input, whole head) or ``"full"`` (256³ input, brain bounding-box crop).
        cache_dir: where the converted model folder lives; default :func:`medgen_cache_dir`
            (``$MEDGEN_CACHE_DIR`` or ``~/.cache/medgen``) ``/models/deepbet-<version>-<which>``.

    Returns:
        LinkNet3d mapping ``(B, 1, D, H, W)`` inputs from :func:`deepbet_preprocess` to
        ``(B, 2, D, H, W)`` softmax probabilities (channel 1 = brain).

    Raises:
        ModelError: deepbet is not installed, or its archive or the cache is unreadable.
    """
    archive_path = deepbet_archive_path(which)
    cache_root = Path(cache_dir) if cache_dir is not None else medgen_cache_dir()
    folder = cache_root / "models" / f"deepbet-{DEEPBET_VERSION}-{which}"
    archive_sha256 = _file_sha256(archive_path)
    spec = deepbet_spec(which)
    spec.provenance["archive_sha256"] = archive_sha256
    try:
        network, cached_spec = load_model(folder)
        if cached_spec.provenance.get("archive_sha256") == archive_sha256:
            return network
    except ModelError:
        pass  # no cache yet, or a damaged one: convert again
    _convert_archive(archive_path, spec, folder)
    network, _ = load_model(folder)
    return network


def _as_volume(volume: torch.Tensor | np.ndarray) -> torch.Tensor:
    # a MONAI MetaTensor is used as a plain tensor: its affine plays no part in deepbet's preprocessing
    if isinstance(volume, torch.Tensor):
        tensor = volume.detach().as_subclass(torch.Tensor)
    else:
        tensor = torch.as_tensor(np.asarray(volume))
    while tensor.ndim > 3 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 3:
        raise BadInputError(
            f"deepbet expects one 3D volume of shape (D, H, W) (or with leading size-1 axes), found shape "
            f"{tuple(tensor.shape)}: pass a single channel."
        )
    return torch.nan_to_num(tensor.float())


def _resize_nearest(volume: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    return F.interpolate(volume[None, None], size=size, mode="nearest-exact")[0, 0]


def deepbet_intensity_range(volume: torch.Tensor | np.ndarray) -> tuple[float, float]:
    """deepbet's clipping range: the 0.5 % and 99.5 % quantiles of the whole volume resized to 128³.

    Args:
        volume: ``(D, H, W)`` intensities in any unit, RAS-oriented.
    """
    small = _resize_nearest(_as_volume(volume), _RANGE_SIZE)
    lower, upper = small.quantile(torch.tensor([_LOWER_QUANTILE, _UPPER_QUANTILE], dtype=small.dtype))  # one sort
    return float(lower), float(upper)


def deepbet_preprocess(
    volume: torch.Tensor | np.ndarray,
    size: tuple[int, int, int] = (128, 128, 128),
    intensity_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Resize and normalise a volume exactly as deepbet does before its network.

    Args:
        volume: ``(D, H, W)`` (or ``(1, D, H, W)``/``(1, 1, D, H, W)``) intensities in RAS orientation (MONAI
            ``Orientation("RAS")``/nibabel ``as_closest_canonical``); NaNs become 0. For the ``full``
            network pass the bounding-box crop.
        size: network input size in voxels: 128³ for ``bbox``, 256³ for ``full``. Voxel spacing is ignored,
            as in deepbet.
        intensity_range: (low, high) clipping range; default :func:`deepbet_intensity_range` of ``volume``.
            For a crop, pass the range of the whole volume, as deepbet does.

    Returns:
        ``(1, 1, *size)`` float32 tensor: z-scored, then scaled to mean 0.449 and std 0.226.
    """
    tensor = _as_volume(volume)
    low, high = intensity_range if intensity_range is not None else deepbet_intensity_range(tensor)
    if not high > low:
        raise BadInputError(
            f"The volume's intensity range [{low}, {high}] is empty (a constant image?): deepbet needs contrast."
        )
    resized = _resize_nearest(tensor, tuple(size))
    scaled = ((resized - low) / (high - low)).clamp(0.0, 1.0)
    standardized = (scaled - scaled.mean()) / scaled.std()
    return (_SCALE * standardized + _SHIFT)[None, None]
