"""The independent quality checker of mask-conditioned synthesis (MRGen's SAM2 check in 3D, spec B.9).

The checker must segment the TARGET modality, yet only the SOURCE modality has labels. It is a small
MONAI UNet trained SynthSeg-style on the source label maps with domain-randomised intensities: every
sample gives each label value a random mean intensity in [0, 1] (plus random within-label texture),
then a random blur, smooth bias field and Gaussian noise, so the network learns shapes rather than
one contrast. Real source images can be mixed in (``real_image_prob``). Label map and image are first
flipped and affinely warped together (``spatial_prob``), so a few label maps teach shapes at new positions
and poses instead of being memorised.

A candidate is scored per organ against its conditioning mask: IoU and Dice of the checker's argmax,
and a confidence = mean max-softmax inside the predicted organ (0 if nothing is predicted). Any
``nn.Module`` mapping images ``(B, 1, I, J, K)`` to logits ``(B, 1 + N, I, J, K)`` can be used as the
checker instead (see :func:`checker_from_model`), and so can a MedGen segmentation model folder, with its own
preprocessing (:class:`SegmentationModelChecker`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.transforms import Compose, RandAffined, RandBiasField, RandFlipd, RandGaussianNoise, RandGaussianSmooth
from monai.utils import convert_to_tensor
from torch import nn

from medgen.diffusion import TrainConfig, train_diffusion
from medgen.errors import BadInputError, GeometryMismatchError, ModelError
from medgen.io.model_folder import model_config, read_model_json, write_model_json
from medgen.labels import name_key
from medgen.models.segmentation import SegmentationModel, predict_probabilities, prepare_volume, probabilities_on_input_grid
from medgen.models.weights import load_weights_into, write_safetensors
from medgen.progress import Reporter
from medgen.synthesis.filtering import CandidateScore
from medgen.synthesis.masks import check_label_map

TASK = "mrgen-checker"
WEIGHTS = "checker.safetensors"

#: percentiles mapped to 0 and 1 before the network (robust to a few outlier voxels of a generated image)
RESCALE_PERCENTILES = (0.5, 99.5)


@dataclasses.dataclass
class CheckerConfig:
    """Settings of the checker network and its training (:meth:`tiny` for CPU tests).

    Args:
        channels, strides, num_res_units: MONAI ``UNet`` architecture (instance norm).
        steps, lr, batch_size, amp, seed, checkpoint_every: training (Adam + Dice-CE loss), see
            :class:`medgen.diffusion.TrainConfig`. ``batch_size > 1`` needs label maps of one grid.
        label_std_max: the within-label intensity std of a sample is drawn from [0, label_std_max].
        blur_sigma_max: Gaussian blur sigma (voxels) drawn from [0.25, blur_sigma_max], half of the samples.
        bias_coeff_max: bias-field polynomial coefficients drawn from [0, bias_coeff_max].
        noise_std_max: additive Gaussian noise std drawn from [0, noise_std_max].
        real_image_prob: chance of training on the real source image instead of a randomised one
            (only where images are given).
        spatial_prob: chance that a sample's label map and image are warped together by a random affine
            (rotation up to ``rotate_max`` radians and scaling up to ``scale_max`` per axis); each axis is
            also flipped with this chance. 0 trains on the label maps as given.
    """

    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 2
    steps: int = 4000
    lr: float = 1e-3
    batch_size: int = 2
    amp: bool = True
    seed: int = 0
    checkpoint_every: int = 500
    label_std_max: float = 0.05
    blur_sigma_max: float = 1.0
    bias_coeff_max: float = 0.3
    noise_std_max: float = 0.05
    real_image_prob: float = 0.2
    spatial_prob: float = 0.5
    rotate_max: float = 0.26
    scale_max: float = 0.1

    @classmethod
    def tiny(cls, **overrides) -> "CheckerConfig":
        """A seconds-long CPU configuration for tests and demos."""
        settings = dict(
            channels=(8, 16, 32), strides=(2, 2), num_res_units=0, steps=250, lr=1e-2, amp=False, checkpoint_every=50,
        )
        settings.update(overrides)
        return cls(**settings)

    @property
    def input_multiple(self) -> int:
        """The network's total downsampling: inputs are padded to a multiple of it."""
        multiple = 1
        for stride in self.strides:
            multiple *= stride
        return multiple


def _device_of(module: nn.Module) -> torch.device:
    """Where ``module``'s parameters are (the CPU for a module without any, such as a rule-based checker)."""
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _percentile(flat: torch.Tensor, percent: float) -> torch.Tensor:
    # kthvalue has no input-size limit, unlike torch.quantile (2**24 elements)
    k = 1 + round(percent / 100.0 * (flat.shape[1] - 1))
    return flat.kthvalue(k, dim=1).values


class Checker(nn.Module):
    """A segmentation network with the checker's input handling.

    ``forward(images (B, 1, I, J, K)) -> logits (B, C, I, J, K)``: optionally maps each image's
    0.5-99.5 percentile range to [0, 1] (so generated images of any scale look alike), pads the grid to
    a multiple of ``input_multiple`` by edge replication, runs ``network`` and crops back.

    Args:
        network: any ``nn.Module`` ``(B, 1, ...) -> (B, C, ...)``.
        input_multiple: spatial sizes the network needs (its total downsampling).
        rescale: percentile rescaling on (as the checkers trained here expect) or off.
    """

    def __init__(self, network: nn.Module, input_multiple: int = 1, rescale: bool = True):
        super().__init__()
        self.network = network
        self.input_multiple = int(input_multiple)
        self.rescale = bool(rescale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        if self.rescale:
            flat = images.flatten(1)
            low = _percentile(flat, RESCALE_PERCENTILES[0]).view(-1, 1, 1, 1, 1)
            high = _percentile(flat, RESCALE_PERCENTILES[1]).view(-1, 1, 1, 1, 1)
            images = ((images - low) / (high - low).clamp_min(1e-6)).clamp(0.0, 1.0)
        size = images.shape[2:]
        padding = [(-s) % self.input_multiple for s in size]
        if any(padding):
            images = F.pad(images, (0, padding[2], 0, padding[1], 0, padding[0]), mode="replicate")
        return self.network(images)[..., : size[0], : size[1], : size[2]]


def build_checker(config: CheckerConfig, num_organs: int) -> Checker:
    """An untrained checker with ``1 + num_organs`` output channels (background + organs)."""
    if num_organs < 1:
        raise BadInputError(f"The checker needs at least one organ; got num_organs={num_organs}.")
    if len(config.channels) != len(config.strides) + 1:
        raise BadInputError(
            f"Checker channels {config.channels} need exactly one more entry than strides {config.strides}."
        )
    network = UNet(
        spatial_dims=3, in_channels=1, out_channels=1 + num_organs, channels=tuple(config.channels),
        strides=tuple(config.strides), num_res_units=config.num_res_units, norm="instance",
    )
    return Checker(network, config.input_multiple, rescale=True)


def checker_from_model(model: nn.Module, *, input_multiple: int = 1, rescale: bool = False) -> Checker:
    """Use a user-supplied segmentation model ``(B, 1, I, J, K) -> (B, 1 + N, I, J, K)`` logits as the checker.

    Its output channels must be background then the organs in label order. ``rescale`` maps images
    to their percentile range first (leave off when the model expects another normalisation).
    """
    return Checker(model, input_multiple, rescale)


class SegmentationModelChecker(nn.Module):
    """A MedGen segmentation model folder (:func:`medgen.models.segmentation.load_segmentation_model`) as the checker.

    Each candidate ``(1, I, J, K)`` in [0, 1] is placed on ``grid_affine`` and segmented as a scan of that grid
    would be (the model's orientation, spacing, intensity normalisation and sliding window); its class
    probabilities come back onto the grid and are reordered to background + ``organ_names`` (matched by name, case
    and spaces ignored; the model's other classes count as background). A constant candidate scores as all
    background. ``forward`` returns log-probabilities ``(B, 1 + N, I, J, K)``, whose softmax is the probabilities.

    Args:
        model: the segmentation model, its network already on the device to run on.
        organ_names: the organs of the masks, label values 1..N in order.
        grid_affine: 4x4 voxel-to-RAS matrix (mm) of the candidates' grid: its spacing and axis order matter.

    Raises:
        BadInputError: an organ the model does not segment (both lists are named).
    """

    def __init__(self, model: SegmentationModel, organ_names: Sequence[str], grid_affine: torch.Tensor):
        super().__init__()
        keys = [name_key(name) for name in model.class_names]
        missing = [name for name in organ_names if name_key(name) not in keys]
        if missing:
            raise BadInputError(f"The checker model {model.name} does not segment the organs {missing}: its classes are "
                                f"{list(model.class_names)}, the masks' organs {list(organ_names)}.")
        self.model = model
        self.network = model.network  # registered, so the checker's device is the network's
        self.channels = [1 + keys.index(name_key(name)) for name in organ_names]
        self.grid_affine = torch.as_tensor(grid_affine, dtype=torch.float64).cpu()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = _device_of(self.network)
        results = []
        for image in convert_to_tensor(images, track_meta=False).detach().float().cpu():
            organs = torch.zeros((len(self.channels), *image.shape[1:]))
            if float(image.min()) < float(image.max()):  # a constant candidate shows no organ (and cannot be normalised)
                prepared, _ = prepare_volume(self.model, MetaTensor(image, affine=self.grid_affine))
                probabilities = probabilities_on_input_grid(prepared, predict_probabilities(self.model, prepared.tensor, device))
                organs = probabilities[self.channels]
            background = (1.0 - organs.sum(0, keepdim=True)).clamp_min(0.0)
            results.append(torch.cat([background, organs]).clamp_min(1e-6).log())
        return torch.stack(results).to(images.device)


def _intensity_transforms(config: CheckerConfig) -> Compose:
    sigma = (0.25, max(0.25, config.blur_sigma_max))
    return Compose(
        [
            RandGaussianSmooth(sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=0.5),
            RandBiasField(coeff_range=(0.0, config.bias_coeff_max), prob=1.0),
            RandGaussianNoise(prob=1.0, std=config.noise_std_max),
        ]
    )


def spatial_transforms(config: CheckerConfig) -> Compose:
    """Joint flips and affine warp of ``{"label", "image"}`` (nearest for the label, bilinear for the image)."""
    keys = ("label", "image")
    flips = [RandFlipd(keys, prob=config.spatial_prob, spatial_axis=axis) for axis in range(3)]
    affine = RandAffined(
        keys, prob=config.spatial_prob, rotate_range=(config.rotate_max,) * 3, scale_range=(config.scale_max,) * 3,
        mode=("nearest", "bilinear"), padding_mode="border",
    )
    return Compose([*flips, affine])


def randomised_image(label: torch.Tensor, num_organs: int, config: CheckerConfig, transforms: Compose) -> torch.Tensor:
    """A SynthSeg-style image ``(1, I, J, K)`` of an integer label map ``(1, I, J, K)``.

    Draws from torch's global RNG only (the MONAI transforms are re-seeded from it), so training is
    reproducible and resumes bit-exactly.
    """
    means = torch.rand(num_organs + 1, device=label.device)
    stds = torch.rand(num_organs + 1, device=label.device) * config.label_std_max
    image = means[label] + stds[label] * torch.randn(label.shape, device=label.device)
    transforms.set_random_state(seed=int(torch.randint(2**31 - 1, ())))
    return convert_to_tensor(transforms(image), track_meta=False).float()


def _training_items(
    label_maps: Sequence[torch.Tensor], num_organs: int, images: Sequence[torch.Tensor] | None, batch_size: int
) -> list[dict[str, Any]]:
    if not label_maps:
        raise BadInputError("No label maps were given to train the checker on.")
    if images is not None and len(images) != len(label_maps):
        raise BadInputError(f"Got {len(images)} images for {len(label_maps)} label maps; give one image per label map or none.")
    items = []
    for index, label in enumerate(label_maps):
        label = check_label_map(label, num_organs)
        image = torch.zeros(label.shape) if images is None else convert_to_tensor(images[index], track_meta=False).float()
        if image.shape != label.shape:
            raise GeometryMismatchError(f"Image {index} {tuple(image.shape)} and its label map {tuple(label.shape)} differ in shape.")
        items.append({"label": label, "image": image, "has_image": images is not None})
    shapes = {tuple(item["label"].shape) for item in items}
    if batch_size > 1 and len(shapes) > 1:
        raise BadInputError(
            f"Label maps of several grids {sorted(shapes)} cannot be batched: use batch_size 1 or resample them to one grid."
        )
    return items


def train_checker(
    label_maps: Sequence[torch.Tensor],
    num_organs: int,
    config: CheckerConfig,
    *,
    images: Sequence[torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
    reporter: Reporter | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
) -> Checker:
    """Train a contrast-agnostic checker on source-modality label maps.

    Args:
        label_maps: integer label maps ``(1, I, J, K)``, values in ``0..num_organs``.
        num_organs: ``N``; the checker predicts ``1 + N`` classes.
        config: see :class:`CheckerConfig`.
        images: the real source images ``(1, I, J, K)``, one per label map, mixed in with
            probability ``config.real_image_prob``; None trains on randomised intensities only.
        device: where to train.
        reporter: progress ``("training", step, steps, loss=...)``; cancellation between steps.
        checkpoint_dir: resumable checkpoints (a run continues from the latest one there).

    Returns:
        the trained :class:`Checker` in eval mode on ``device``.
    """
    items = _training_items(label_maps, num_organs, images, config.batch_size)
    torch.manual_seed(config.seed)
    checker = build_checker(config, num_organs).to(device)
    transforms = _intensity_transforms(config)
    spatial = spatial_transforms(config) if config.spatial_prob > 0 else None
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs, labels = [], []
        for label, image, has_image in zip(batch["label"], batch["image"], batch["has_image"]):
            if spatial is not None:
                spatial.set_random_state(seed=int(torch.randint(2**31 - 1, ())))
                warped = spatial({"label": label.float(), "image": image})
                label = convert_to_tensor(warped["label"], track_meta=False).round().long()
                image = convert_to_tensor(warped["image"], track_meta=False).float()
            use_real = bool(has_image) and torch.rand(()).item() < config.real_image_prob
            inputs.append(image if use_real else randomised_image(label, num_organs, config, transforms))
            labels.append(label)
        return dice_ce(model(torch.stack(inputs)), torch.stack(labels))

    train_config = TrainConfig(
        max_steps=config.steps, batch_size=config.batch_size, amp=config.amp, seed=config.seed,
        checkpoint_every=config.checkpoint_every,
    )
    optimizer = torch.optim.Adam(checker.parameters(), lr=config.lr)
    train_diffusion(checker, loss_fn, items, optimizer, train_config, checkpoint_dir=checkpoint_dir, reporter=reporter)
    return checker.eval()


def score_candidates(
    checker: nn.Module,
    images: torch.Tensor,
    condition_label: torch.Tensor,
    organ_names: Sequence[str],
    *,
    mask_id: str,
    first_index: int = 0,
) -> list[CandidateScore]:
    """Score generated candidates against the mask they were conditioned on.

    Args:
        checker: a :class:`Checker` or any module ``(B, 1, I, J, K) -> (B, 1 + N, I, J, K)`` logits.
        images: candidates ``(B, 1, I, J, K)`` in [0, 1].
        condition_label: the conditioning label map ``(1, I, J, K)``, values in ``0..N``.
        organ_names: ``N`` names, organ ``j`` = ``organ_names[j-1]``.
        mask_id: recorded in every score.
        first_index: candidate index of ``images[0]`` (the rest follow).

    Returns:
        one :class:`CandidateScore` per image; organs absent from the condition score 0 and are listed
        in ``absent_organs``.
    """
    num_organs = len(organ_names)
    condition = check_label_map(condition_label, num_organs)
    images = convert_to_tensor(images, track_meta=False)
    if images.ndim != 5 or images.shape[1] != 1 or tuple(images.shape[2:]) != tuple(condition.shape[1:]):
        raise GeometryMismatchError(
            f"Candidates must be (B, 1, {', '.join(map(str, condition.shape[1:]))}) like the conditioning mask; "
            f"got {tuple(images.shape)}."
        )
    device = _device_of(checker)
    condition = condition[0].to(device)
    absent = tuple(name for j, name in enumerate(organ_names, start=1) if not (condition == j).any())
    checker.eval()
    scores = []
    with torch.no_grad():
        for offset, image in enumerate(images):
            logits = checker(image[None].to(device))
            if logits.shape[1] != 1 + num_organs:
                raise ModelError(
                    f"The checker outputs {logits.shape[1]} channels; {1 + num_organs} are needed "
                    f"(background + organs {list(organ_names)})."
                )
            confidence, predicted = logits[0].float().softmax(dim=0).max(dim=0)
            iou, dice, organ_confidence = {}, {}, {}
            for j, name in enumerate(organ_names, start=1):
                expected, found = condition == j, predicted == j
                overlap, union = int((expected & found).sum()), int((expected | found).sum())
                sizes = int(expected.sum()) + int(found.sum())
                present = name not in absent
                iou[name] = overlap / union if present else 0.0
                dice[name] = 2.0 * overlap / sizes if present else 0.0
                organ_confidence[name] = float(confidence[found].mean()) if present and found.any() else 0.0
            scores.append(CandidateScore(mask_id, first_index + offset, iou, organ_confidence, dice, absent))
    return scores


def save_checker(
    model: Checker, config: CheckerConfig, num_organs: int, folder: str | os.PathLike,
    organ_names: Sequence[str] | None = None,
) -> Path:
    """Write a checker built from ``config`` to ``folder`` (``medgen_model.json`` + ``checker.safetensors``)."""
    if not isinstance(model, Checker):
        raise BadInputError(f"save_checker saves checkers built by train_checker/load_checker; got {type(model).__name__}.")
    folder = Path(folder)
    write_safetensors(model.network.state_dict(), folder / WEIGHTS)
    names = list(organ_names) if organ_names is not None else None
    write_model_json(folder, TASK, config=dataclasses.asdict(config), num_organs=int(num_organs), organ_names=names)
    return folder


def load_checker(
    folder: str | os.PathLike, device: str | torch.device = "cpu", organ_names: Sequence[str] | None = None
) -> Checker:
    """The checker saved by :func:`save_checker`, in eval mode on ``device``.

    Args:
        organ_names: the organs (label values 1..N, in order) the caller's masks use; a checker that recorded
            other organs or another order is refused, since its scores would land under the wrong organs.

    Raises:
        ModelError: no checker there, or one of other organs.
    """
    document = read_model_json(folder, TASK)
    recorded = document.get("organ_names")
    if organ_names is not None and recorded is not None and list(recorded) != list(organ_names):
        raise ModelError(
            f"The checker in {folder} was trained on the organs {list(recorded)} (label values 1..{len(recorded)}), but the "
            f"masks use {list(organ_names)}: pick a checker trained on these organs in this order."
        )
    config = model_config(folder, document, CheckerConfig, "checker")
    checker = build_checker(config, int(document["num_organs"]))
    load_weights_into(checker.network, Path(folder) / WEIGHTS)
    return checker.to(device).eval()
