"""A segmentation network together with the preprocessing that maps a volume to its input and back.

Two families: deepbet's brain-extraction LinkNet3d (RAS orientation, resize to 128³ ignoring spacing,
deepbet's intensity normalisation) and MONAI networks from a MedGen model folder (the spec's orientation,
optional resampling to the spec's spacing, intensity normalisation, sliding-window inference with
Gaussian blending over the spec's patch size). Predictions come back on the input's own voxel grid.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import NormalizeIntensity, ScaleIntensityRange, Spacing
from torch import nn

from medgen.errors import BadInputError, ModelError
from medgen.io import axis_codes, check_not_constant, display_name, oriented, scale_to_unit


@dataclasses.dataclass
class SegmentationModel:
    """A network that outputs class logits plus how to feed it.

    Args:
        network: ``(B, 1, D, H, W) -> (B, num_classes, D, H, W)`` logits.
        class_names: names of classes 1..num_classes-1 (class 0 is background).
        input_size: fixed network input grid (deepbet: 128³, volumes are resized to it), or None.
        patch_size: sliding-window ROI; also the training patch size.
        spacing_mm: resample inputs to this spacing first (None: keep the input's spacing).
        normalize: ``volume (D, H, W) -> normalised volume`` of the same shape.
        name: shown in reports.
        orientation: axis codes the network's input axes follow (MONAI ``Orientation``), e.g. ``"RAS"``.
    """

    network: nn.Module
    class_names: list[str]
    input_size: tuple[int, int, int] | None
    patch_size: tuple[int, int, int]
    spacing_mm: tuple[float, float, float] | None
    normalize: Callable[[torch.Tensor], torch.Tensor]
    name: str
    orientation: str = "RAS"

    @property
    def num_classes(self) -> int:
        return len(self.class_names) + 1


def head_class_names(class_names: list[str], options: dict) -> list[str]:
    """Classes 1.. of a model whose head an adapter replaced (FSEFT), from the adapter's method options.

    Args:
        class_names: the base model's classes 1..K-1 (class 0, channel 0, is background).
        options: the adapter's options: ``head_rows`` keeps those output channels of the pretrained head
            (so their classes, renumbered in that order), ``head_out_channels`` makes a fresh head whose
            classes are named "class 1".. ; neither keeps ``class_names``.

    Raises:
        BadInputError: rows that do not keep the background channel first, a row beyond the head, or
            a fresh head with fewer than two channels.
    """
    rows, channels = options.get("head_rows"), options.get("head_out_channels")
    if rows is not None:
        names = ["background", *class_names]
        if len(rows) < 2 or rows[0] != 0 or any(not 0 <= row < len(names) for row in rows):
            raise BadInputError(
                f"head_rows {rows} must start with 0 (the background channel) and list at least one of the "
                f"head's channels 1..{len(names) - 1} ({', '.join(f'{n}: {name}' for n, name in enumerate(names))})."
            )
        return [names[row] for row in rows[1:]]
    if channels is not None:
        if channels < 2:
            raise BadInputError(f"head_out_channels must be at least 2 (background and one class), got {channels}.")
        return [f"class {number}" for number in range(1, channels)]
    return list(class_names)


def relabel_by_name(labels: torch.Tensor, from_names: list[str], to_names: list[str]) -> torch.Tensor:
    """A label map of classes ``from_names`` (values 1..) as an int64 tensor of the same shape numbered
    by ``to_names``; classes missing from ``to_names`` become background. Lets a base model be scored on
    an adapted head's classes."""
    table = torch.zeros(len(from_names) + 1, dtype=torch.long)
    for value, name in enumerate(from_names, start=1):
        table[value] = to_names.index(name) + 1 if name in to_names else 0
    values = labels.as_tensor() if isinstance(labels, MetaTensor) else labels
    return table.to(values.device)[values.long()]


def _deepbet_normalize(volume: torch.Tensor) -> torch.Tensor:
    from medgen.models import deepbet_preprocess

    return deepbet_preprocess(volume, size=tuple(volume.shape))[0, 0]


def deepbet_model(which: str = "bbox") -> SegmentationModel:
    """deepbet's pretrained brain extraction (weights from the deepbet wheel), returning logits."""
    from medgen.models import load_deepbet

    network = load_deepbet(which)
    network.softmax = False  # logits for training and for our own softmax/argmax
    size = (128, 128, 128) if which == "bbox" else (256, 256, 256)
    # Train on whole volumes: deepbet's InstanceNorm layers normalise with per-input statistics, and
    # 64³ foreground-centred patches shifted them enough to drop held-out Dice from 0.97 to 0.79 (measured).
    return SegmentationModel(network, ["brain"], size, size, None, _deepbet_normalize, f"deepbet-{which}")


@dataclasses.dataclass
class PreparedInput:
    """The network-grid tensor of a volume plus what is needed to map predictions back."""

    tensor: torch.Tensor  # (1, 1, D, H, W) network input
    oriented: MetaTensor  # the input on the model's orientation (and resampled grid), (1, I, J, K)
    original: MetaTensor  # the input as given


def prepare_volume(model: SegmentationModel, image: MetaTensor, label: MetaTensor | None = None):
    """Map ``image`` (and optionally its ``label``) to the network grid.

    Returns:
        ``(PreparedInput, label tensor (1, 1, D, H, W) int64 or None)``.
    """
    if image.ndim != 4 or image.shape[0] != 1:
        raise BadInputError(f"Expected a single-channel volume (1, I, J, K); got {tuple(image.shape)}.")
    if not bool(torch.isfinite(image).all()):
        raise BadInputError(f"{display_name(image, 'The image')} holds NaN or infinite voxels; fill or mask them first.")
    check_not_constant(image, display_name(image, "The image"), "to segment")
    on_axes = oriented(image.float(), model.orientation)
    label_on_axes = oriented(label.float(), model.orientation) if label is not None else None
    if model.spacing_mm is not None:
        on_axes = Spacing(pixdim=model.spacing_mm, mode="bilinear")(on_axes)
        if label_on_axes is not None:
            label_on_axes = Spacing(pixdim=model.spacing_mm, mode="nearest")(label_on_axes)
    grid = on_axes.as_tensor()[0]
    if model.input_size is not None:
        grid = F.interpolate(grid[None, None], size=model.input_size, mode="nearest-exact")[0, 0]
    tensor = model.normalize(grid)[None, None].float()
    label_tensor = None
    if label_on_axes is not None:
        label_grid = label_on_axes.as_tensor()[None]
        size = model.input_size or tuple(grid.shape)
        label_tensor = F.interpolate(label_grid, size=size, mode="nearest-exact").round().long()
    return PreparedInput(tensor, MetaTensor(on_axes.as_tensor(), affine=on_axes.affine), image), label_tensor


@torch.no_grad()
def predict_probabilities(model: SegmentationModel, tensor: torch.Tensor, device: torch.device, overlap: float = 0.25) -> torch.Tensor:
    """Softmax probabilities ``(1, num_classes, D, H, W)`` on the network grid (sliding window, Gaussian blending)."""
    model.network.eval()
    roi = model.input_size or model.patch_size
    logits = sliding_window_inference(
        tensor.to(device), roi_size=roi, sw_batch_size=1, predictor=model.network, overlap=overlap, mode="gaussian"
    )
    return torch.softmax(logits.float(), dim=1).cpu()


def _on_input_grid(prepared: PreparedInput, volume: torch.Tensor, mode: str) -> torch.Tensor:
    """``volume`` ``(1, C, D, H, W)`` on the network grid, mapped back onto the original input grid: ``(C, I, J, K)``.
    ``mode``: ``"nearest"`` for labels, ``"bilinear"`` (trilinear) for probabilities."""
    oriented_shape = tuple(prepared.oriented.shape[1:])
    resize_mode = "nearest-exact" if mode == "nearest" else "trilinear"
    volume = volume.as_tensor() if isinstance(volume, MetaTensor) else volume  # its own meta would clash with the affine
    on_oriented = MetaTensor(F.interpolate(volume, size=oriented_shape, mode=resize_mode)[0], affine=prepared.oriented.affine)
    original = prepared.original
    if not np.allclose(np.asarray(prepared.oriented.affine), np.asarray(original.affine)) or on_oriented.shape[1:] != original.shape[1:]:
        spatial_size = tuple(original.shape[1:])
        on_oriented = oriented(on_oriented, axis_codes(original.affine))
        if tuple(on_oriented.shape[1:]) != spatial_size or not np.allclose(np.asarray(on_oriented.affine), np.asarray(original.affine), atol=1e-4):
            from monai.transforms import SpatialResample

            on_oriented = SpatialResample(mode=mode)(on_oriented, dst_affine=original.affine, spatial_size=spatial_size)
    return on_oriented.as_tensor()


def labels_on_input_grid(prepared: PreparedInput, probabilities: torch.Tensor) -> MetaTensor:
    """Argmax labels mapped back onto the original input grid (nearest neighbour), ``(1, I, J, K)`` int64."""
    labels = _on_input_grid(prepared, probabilities.argmax(dim=1, keepdim=True).float(), "nearest")
    return MetaTensor(labels.round().long(), affine=prepared.original.affine)


def probabilities_on_input_grid(prepared: PreparedInput, probabilities: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``(1, C, D, H, W)`` on the network grid mapped back onto the original input grid
    (trilinear, then renormalised to sum to 1 per voxel): ``(C, I, J, K)`` float32."""
    on_grid = _on_input_grid(prepared, probabilities.float(), "bilinear").clamp_min(0)
    return on_grid / on_grid.sum(0, keepdim=True).clamp_min(1e-12)


def segment(model: SegmentationModel, image: MetaTensor, device: torch.device | str = "cpu") -> MetaTensor:
    """Segment ``image`` ``(1, I, J, K)``; returns an int64 label map on the same grid."""
    prepared, _ = prepare_volume(model, image)
    return labels_on_input_grid(prepared, predict_probabilities(model, prepared.tensor, torch.device(device)))


def _intensity_normalizer(settings: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """The volume ``(D, H, W)`` -> volume normalisation a model spec asks for (``medgen.models.spec.INTENSITY_METHODS``,
    with their parameters: ``nonzero`` for zscore, ``a_min``/``a_max``/``b_min``/``b_max`` for range, ``lower``/``upper``
    percentiles for percentile).

    Raises:
        ModelError: an unknown method (the parameters were checked with the spec, :class:`medgen.models.ModelSpec`).
    """
    method = settings.get("method", "none")
    if method == "none":
        return lambda volume: volume
    if method == "zscore":
        transform = NormalizeIntensity(nonzero=bool(settings.get("nonzero", False)))
    elif method == "range":
        transform = ScaleIntensityRange(settings["a_min"], settings["a_max"], settings.get("b_min", 0.0),
                                        settings.get("b_max", 1.0), clip=True)
    elif method == "percentile":
        transform = partial(scale_to_unit, lower=settings.get("lower", 0.5), upper=settings.get("upper", 99.5))
    elif method == "deepbet":
        return _deepbet_normalize
    else:
        raise ModelError(f"Unsupported intensity normalisation {method!r} in the model spec.")
    return lambda volume: transform(volume[None].clone())[0]  # MONAI's zscore on nonzero voxels writes in place


def load_segmentation_model(source: str) -> SegmentationModel:
    """``"deepbet"``/``"deepbet-bbox"`` for the packaged deepbet network, else a MedGen model folder
    (``model.json`` + safetensors, see :mod:`medgen.models`) of a segmentation network with a softmax head."""
    if source in ("deepbet", "deepbet-bbox"):
        return deepbet_model("bbox")
    if not Path(source).is_dir():
        raise BadInputError(f"The segmentation model {source!r} is neither 'deepbet' (the packaged brain extractor) nor "
                            "an existing MedGen model folder (model.json + weights). Give one of the two.")
    from medgen.models import load_model

    network, spec = load_model(source)
    if spec.output_activation not in ("softmax", "none") or len(spec.class_names) < 2:
        raise BadInputError(
            f"{source} is not a multi-class segmentation model (output {spec.output_activation!r}, classes {spec.class_names})."
        )
    if hasattr(network, "softmax"):
        network.softmax = False
    preprocessing = spec.preprocessing
    patch = tuple(preprocessing.patch_size or (96, 96, 96))
    spacing = tuple(preprocessing.spacing_mm) if preprocessing.spacing_mm else None
    return SegmentationModel(network, list(spec.class_names[1:]), None, patch, spacing, _intensity_normalizer(preprocessing.intensity),
                             spec.name or str(source), preprocessing.orientation)
