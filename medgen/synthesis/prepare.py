"""Training pairs for paired synthesis: discovery, geometry checks, resampling, label remapping.

Images are resampled with trilinear interpolation and label maps with nearest neighbour (MONAI
``Spacingd``) when a spacing is given, intensities scaled to [0, 1] by robust percentiles, then
padded (with background, 0) or cropped to one shape (``ResizeWithPadOrCropd``), and label values
remapped to 0..K-1 with their names kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
from functools import partial
from pathlib import Path

import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Lambdad, ResizeWithPadOrCropd, Spacingd

from medgen.errors import BadInputError
from medgen.io import check_not_constant, check_same_geometry, load_volume, nearest_multiple_shape, oriented, scale_to_unit
from medgen.labels import LabelInfo, default_color, make_labels
from medgen.progress import Reporter, as_reporter

IMAGE_SUFFIX = "_0000.nii.gz"
LABEL_SUFFIX = ".nii.gz"


@dataclasses.dataclass
class PreparedPair:
    """One training case on the common grid.

    Attributes:
        case: identifier (file stem or node name).
        image: float32 MetaTensor ``(1, I, J, K)`` in [0, 1].
        label: int64 MetaTensor ``(1, I, J, K)`` with values 0..K-1 (0 background).
    """

    case: str
    image: MetaTensor
    label: MetaTensor


def find_nnunet_pairs(folder: str | os.PathLike) -> list[tuple[str, Path, Path]]:
    """``(case, image, label)`` triples from an nnU-Net raw folder (``imagesTr``/``labelsTr``) or a flat
    folder holding ``{case}_0000.nii.gz`` next to ``{case}.nii.gz``."""
    folder = Path(folder)
    images_dir = folder / "imagesTr" if (folder / "imagesTr").is_dir() else folder
    labels_dir = folder / "labelsTr" if (folder / "labelsTr").is_dir() else folder
    pairs = []
    for image in sorted(images_dir.glob(f"*{IMAGE_SUFFIX}")):
        case = image.name[: -len(IMAGE_SUFFIX)]
        label = labels_dir / f"{case}{LABEL_SUFFIX}"
        second_channel = images_dir / f"{case}_0001{LABEL_SUFFIX}"
        # one channel is all MedGen trains on and exports: the others would be dropped (in a flat folder the file may
        # instead be the label of a case "<case>_0001", which has its own image)
        if second_channel.is_file() and not (images_dir / f"{case}_0001{IMAGE_SUFFIX}").is_file():
            raise BadInputError(f"Case {case} has a second channel ({second_channel.name}); MedGen's paired synthesis and "
                                "nnU-Net export take one channel per case. Give a folder with the channel to use only.")
        if not label.is_file():
            raise BadInputError(f"Image {image.name} has no label map {label.name} in {labels_dir}.")
        pairs.append((case, image, label))
    if not pairs:
        raise BadInputError(f"No '{{case}}{IMAGE_SUFFIX}' images found in {images_dir}; use nnU-Net naming.")
    return pairs


def nnunet_folder_labels(folder: str | os.PathLike) -> list[LabelInfo]:
    """The structures an nnU-Net raw folder's ``dataset.json`` names (``{"background": 0, "liver": 1}``, or nnU-Net
    v1 / MSD's ``{"0": "background", "1": "liver"}``); empty without a ``dataset.json``.

    Raises:
        BadInputError: a ``dataset.json`` whose labels are not one whole number per name (regions such as [1, 2]).
    """
    dataset_json = Path(folder) / "dataset.json"
    if not dataset_json.is_file():
        return []
    try:
        labels = json.loads(dataset_json.read_text(encoding="utf-8")).get("labels", {})
        if labels and all(isinstance(value, str) and not value.strip().isdigit() for value in labels.values()):
            labels = {name: value for value, name in labels.items()}
        if any(isinstance(value, (list, dict, bool)) for value in labels.values()):
            raise ValueError(f"regions such as [1, 2] are not organs: {labels}")
        labels = {str(name): _whole_label_value(value) for name, value in labels.items()}
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise BadInputError(f"{dataset_json} does not name its labels as expected ({error}): 'labels' must map each "
                            'name to one whole number, e.g. {"background": 0, "liver": 1}.') from error
    return make_labels({name: value for name, value in labels.items() if value != 0})


def _whole_label_value(value) -> int:
    """A dataset.json label value as an int: 3, 3.0 and "3" are read; 3.5 is refused."""
    number = float(value)
    if number != int(number):
        raise ValueError(f"label value {value!r} is not a whole number")
    return int(number)


def label_remapping(label_maps: list[torch.Tensor], labels: list[LabelInfo] | None) -> tuple[dict[int, int], list[LabelInfo]]:
    """Map the original label values to 0..K-1 (sorted by value) and name them.

    Args:
        label_maps: the training label maps (integer tensors).
        labels: names/colours of the original values; unnamed values get ``Label <v>``.

    Returns:
        ``(old value -> new value, labels with the new values)``; background 0 stays 0.
    """
    found = sorted({int(v) for label_map in label_maps for v in torch.unique(label_map).tolist()} - {0})
    if found and found[0] < 0:
        raise BadInputError(f"The label maps hold negative values {[value for value in found if value < 0]}; label values "
                            "must be 0 (background) or positive integers.")
    named = {label.value: label for label in labels or []}
    unknown = sorted(set(named) - set(found))
    if labels is not None and set(found) - set(named):
        raise BadInputError(
            f"The label maps hold values {sorted(set(found) - set(named))} that the label list "
            f"{sorted(named)} does not name. Name every structure or fix the label maps."
        )
    mapping = {0: 0}
    new_labels = []
    for new_value, old_value in enumerate(sorted(set(found) | set(unknown)), start=1):
        mapping[old_value] = new_value
        source = named.get(old_value, LabelInfo(f"Label {old_value}", old_value, default_color(old_value)))
        new_labels.append(dataclasses.replace(source, value=new_value))
    return mapping, new_labels


def _remap(label_map: torch.Tensor, mapping: dict[int, int]) -> torch.Tensor:
    lookup = torch.zeros(max(mapping) + 1, dtype=torch.int64)
    for old, new in mapping.items():
        lookup[old] = new
    return lookup[label_map.long()]


def _warn_about_cropped_labels(case: str, before: MetaTensor, after: MetaTensor, shape, reporter: Reporter) -> None:
    """Warn when cropping to ``shape`` around the centre cut labelled voxels off a label map ``(1, I, J, K)``."""
    labelled, kept = int((before > 0).sum()), int((after > 0).sum())
    if kept < labelled:
        spacing = [round(float(value), 3) for value in before.pixdim]
        reporter.log(
            f"Case {case!r}: cropping its {tuple(before.shape[1:])} voxels of {spacing} mm to the shape {tuple(shape)} "
            f"around the centre cut off {labelled - kept} of its {labelled} labelled voxels; give a coarser spacing "
            "(--spacing-mm) to resample the pairs into the shape instead.", "warning")


def _warn_about_mixed_spacings(pairs: list[tuple[str, MetaTensor, MetaTensor]], reporter: Reporter) -> None:
    """Warn when cases kept at their own spacing (no ``spacing_mm``) differ in it by more than 1 %: the model then
    mixes physical scales, and what it generates is written with the first case's spacing."""
    spacings = torch.stack([torch.as_tensor(image.pixdim, dtype=torch.float64)[:3] for _, image, _ in pairs])
    low, high = spacings.min(dim=0).values, spacings.max(dim=0).values
    if bool((high > low * 1.01).any()):
        ranges = ", ".join(f"{float(a):.3g}-{float(b):.3g}" for a, b in zip(low, high))
        reporter.log(
            f"The cases' voxel spacings differ ({ranges} mm per axis) and no spacing was given, so each keeps its own: "
            f"the model mixes physical scales and writes what it generates with case {pairs[0][0]!r}'s spacing. Give a "
            "spacing (--spacing-mm) to resample every case to it.", "warning")


def prepare_pairs(
    pairs: list[tuple[str, MetaTensor, MetaTensor]],
    *,
    shape: tuple[int, int, int],
    spacing_mm: tuple[float, float, float] | None = None,
    labels: list[LabelInfo] | None = None,
    intensity_percentiles: tuple[float, float] = (0.5, 99.5),
    orientation: str = "RAS",
    reporter: Reporter | None = None,
) -> tuple[list[PreparedPair], list[LabelInfo]]:
    """Bring training pairs onto one grid and label set.

    Args:
        pairs: ``(case, image, label)`` with image ``(1, I, J, K)`` float and label ``(1, I, J, K)`` int,
            each pair on one grid (checked).
        shape: output grid shape ``(I, J, K)`` (voxels); cropped or zero-padded around the centre (a crop that
            cuts labelled voxels off is reported as a warning).
        spacing_mm: resample to this spacing (trilinear images, nearest labels) before the crop; None keeps
            each case's own spacing.
        labels: names of the original label values (None: ``Label <v>``).
        intensity_percentiles: image values at these percentiles map to 0 and 1 (then clipped).
        orientation: axis codes every case's voxel axes are laid out in first (MONAI ``Orientation``), so that
            scans stored in different orders (e.g. a NIfTI and an LPS NRRD) are not learned mirrored or rotated
            against each other; the prepared affines place every voxel where it was.
        reporter: receives a warning when label values are renumbered (label maps given to the trained
            model, e.g. generation masks, must use the new values) and when a crop cuts labels off.

    Returns:
        ``(prepared pairs, labels with values 1..K-1)``.
    """
    reporter = as_reporter(reporter)
    if not pairs:
        raise BadInputError("No training pairs were given.")
    for case, image, label in pairs:
        if image.shape[0] != 1 or label.shape[0] != 1:
            raise BadInputError(
                f"Case {case!r} has an image of {image.shape[0]} and a label map of {label.shape[0]} component(s): "
                "synthesis learns one grey-value image and one label map per case. Give scalar volumes (a vector or "
                "RGB volume has one component per channel).")
        check_same_geometry(image, label, f"{case} image", f"{case} label")
        check_not_constant(image, f"The image of case {case!r}", "to learn from")
    pairs = [(case, oriented(image.float(), orientation), oriented(label.float(), orientation)) for case, image, label in pairs]
    if spacing_mm is None:
        _warn_about_mixed_spacings(pairs, reporter)
    mapping, new_labels = label_remapping([label for _, _, label in pairs], labels)
    original = {new: old for old, new in mapping.items()}
    renumbered = [f"{label.name} {original[label.value]} -> {label.value}" for label in new_labels if original[label.value] != label.value]
    if renumbered:
        reporter.log(f"Label values renumbered 1..{len(new_labels)} ({', '.join(renumbered)}): label maps "
                                  "given to the trained model must use the new values (medgen_model.json lists them).", "warning")
    resample = Spacingd(keys=("image", "label"), pixdim=spacing_mm, mode=("bilinear", "nearest")) if spacing_mm else None
    # scale before padding, so padded voxels are background (0) whatever the raw units (air in HU is -1000, not 0)
    fit = Compose([
        Lambdad(keys="image", func=partial(scale_to_unit, lower=intensity_percentiles[0], upper=intensity_percentiles[1])),
        ResizeWithPadOrCropd(keys=("image", "label"), spatial_size=shape),
    ])
    prepared = []
    for case, image, label in pairs:
        pair = {"image": image, "label": label}
        pair = resample(pair) if resample is not None else pair
        out = fit(pair)
        _warn_about_cropped_labels(case, pair["label"], out["label"], shape, reporter)
        prepared.append(
            PreparedPair(
                case=case,
                image=MetaTensor(out["image"].as_tensor().float(), affine=out["image"].affine),
                label=MetaTensor(_remap(out["label"].as_tensor().round(), mapping), affine=out["label"].affine),
            )
        )
    return prepared, new_labels


def load_pairs_from_folder(folder: str | os.PathLike) -> list[tuple[str, MetaTensor, MetaTensor]]:
    """Read every nnU-Net-named pair of ``folder`` (see :func:`find_nnunet_pairs`)."""
    return [
        (case, load_volume(image, name=image.name), load_volume(label, label=True, name=label.name))
        for case, image, label in find_nnunet_pairs(folder)
    ]


def check_common_grid(cases: list, vae_factor: int, unet_levels: int) -> tuple[int, ...]:
    """The shared voxel grid ``(I, J, K)`` of training cases (anything with an ``image`` ``(1, I, J, K)``).

    Args:
        vae_factor: the autoencoder's downsampling per axis.
        unet_levels: levels of the latent UNet; it halves the latent grid ``unet_levels - 1`` times.

    Raises:
        BadInputError: no cases, cases on different grids, or a grid the two networks cannot divide exactly
            (checked here, before any stage trains).
    """
    if not cases:
        raise BadInputError("No training pairs were given.")
    shape = tuple(cases[0].image.shape[1:])
    if any(tuple(case.image.shape[1:]) != shape for case in cases):
        raise BadInputError("All training pairs must share one grid: prepare them with medgen.synthesis.prepare_pairs.")
    multiple = vae_factor * 2 ** (unet_levels - 1)
    if any(size % multiple for size in shape):
        raise BadInputError(
            f"The grid {shape} must be divisible by {multiple}: the VAE downsamples {vae_factor}x and the latent UNet "
            f"halves {unet_levels - 1}x more. Use e.g. {nearest_multiple_shape(shape, multiple)}."
        )
    return shape
