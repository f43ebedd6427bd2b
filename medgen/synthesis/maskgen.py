"""MRGen-style mask-conditioned synthesis in 3D (spec B.9), generation side: load a model folder written by
:func:`medgen.synthesis.maskgen_training.train_maskgen` and render target-modality images from source-modality
organ masks.

Generation follows MRGen's inference (spec B.5): DDIM with diffusers' "leading" timesteps, classifier-free
guidance against the *embedding of the empty prompt*, the ControlNet applied to both branches, K candidates
per mask in chunks; candidates are scored by the checker and filtered by :func:`select_candidates`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Sequence

import torch
from monai.data import MetaTensor
from monai.transforms import ResizeWithPadOrCrop, Spacing, SpatialCrop, SpatialResample
from monai.utils import convert_to_tensor
from torch import nn

from medgen.diffusion import batched_cfg_denoiser, controlnet_denoiser, sample
from medgen.errors import BadInputError, ModelError
from medgen.io import axis_codes, holds_whole_numbers, oriented, save_volume
from medgen.io.atomic import write_text_atomic
from medgen.io.model_folder import MODEL_JSON, model_config, read_model_json
from medgen.labels import LabelInfo, save_labels
from medgen.models.segmentation import load_segmentation_model
from medgen.models.spec import SPEC_FILE
from medgen.models.weights import load_weights_into
from medgen.progress import Reporter, as_reporter
from medgen.synthesis.checker import SegmentationModelChecker, load_checker, score_candidates
from medgen.synthesis.filtering import CandidateScore, FilterDecision, FilterThresholds, select_candidates
from medgen.synthesis.maskgen_networks import (
    MaskGenConfig,
    build_controlnet,
    build_image_vae,
    build_latent_unet,
    sampling_scheduler,
)
from medgen.synthesis.masks import MASK_THRESHOLD, control_channels, control_tensor, foreground_fraction
from medgen.synthesis.prompts import LearnedPromptEncoder, Prompt, PromptEncoder

TASK = "mask-conditioned-ldm"
#: what sampling reads from a model folder's ``medgen_model.json`` besides ``config`` (name -> JSON type)
MODEL_FIELDS = {"organs": list, "prompt_encoder": dict, "prompts": dict, "scale_factor": (int, float), "grid_shape": list,
                "affine": list, "latent_shape": list}
CHECKER_DIR = "checker"
#: longest mask id (file stem) whose pair names "<id>_<k>_image.nii.gz" and their temporary names fit 255 bytes
MAX_MASK_ID_BYTES = 150


def _stored_prompt_encoder(model_dir: Path, recorded: dict, text_encoder: PromptEncoder | None) -> PromptEncoder:
    """The prompt encoder a model folder was trained with: its learned table (on the CPU, frozen), or
    ``text_encoder`` after checking it against the recorded context shape."""
    if recorded.get("kind", "learned") == "learned":
        if text_encoder is not None:
            raise ModelError(f"{model_dir} was trained with MedGen's learned prompt table, not a text model; load it "
                             "without prompt_encoder.")
        learned = load_weights_into(LearnedPromptEncoder.from_config(recorded), model_dir / "prompt_encoder.safetensors")
        return learned.eval().requires_grad_(False)
    expected = (recorded["context_length"], recorded["embedding_dim"])
    if text_encoder is None:
        raise ModelError(
            f"{model_dir} was trained with a local text model (context {expected[0]} x {expected[1]}), which the folder "
            "does not hold: load it from Python with MaskGenModel.load(folder, prompt_encoder=FrozenTextEncoder(...)) "
            "and the same text model."
        )
    if (text_encoder.context_length, text_encoder.embedding_dim) != expected:
        raise ModelError(f"{model_dir} was trained with a text model of context {expected[0]} x {expected[1]}, but the "
                         f"given one returns {text_encoder.context_length} x {text_encoder.embedding_dim}.")
    return text_encoder


@dataclasses.dataclass
class MaskGenModel:
    """A trained generator loaded for sampling (eval mode, frozen).

    Attributes:
        document: the model's ``medgen_model.json``.
        organs: organ ``j`` = ``organs[j-1]`` (label value j).
        prompts: the training prompts by modality.
        grid_affine: the training grid's affine; ``grid_shape`` its shape ``(I, J, K)``.
    """

    document: dict
    config: MaskGenConfig
    vae: nn.Module
    unet: nn.Module
    prompt_encoder: PromptEncoder
    controlnet: nn.Module
    scale_factor: float
    organs: list[LabelInfo]
    prompts: dict[str, Prompt]
    grid_shape: tuple[int, ...]
    grid_affine: torch.Tensor

    @classmethod
    def load(
        cls, model_dir: str | os.PathLike, device: torch.device | str = "cpu", prompt_encoder: PromptEncoder | None = None
    ) -> "MaskGenModel":
        """Read a model folder written by :func:`medgen.synthesis.maskgen_training.train_maskgen`.

        Args:
            prompt_encoder: the local text model the folder was trained with (its ``medgen_model.json`` says
                ``"kind": "text"``); leave None for the learned table, which the folder holds.

        Raises:
            ModelError: a damaged folder, or a text-model folder loaded without its text model (or the reverse).
        """
        model_dir, device = Path(model_dir), torch.device(device)
        document = read_model_json(model_dir, TASK, MODEL_FIELDS)
        config = model_config(model_dir, document, MaskGenConfig, "mask-model")
        organs = [LabelInfo.from_dict(e) for e in document["organs"]]
        prompt_encoder = _stored_prompt_encoder(model_dir, document["prompt_encoder"], prompt_encoder)
        if isinstance(prompt_encoder, LearnedPromptEncoder):
            prompt_encoder = prompt_encoder.to(device)
        unet = load_weights_into(build_latent_unet(config), model_dir / "unet.safetensors")
        controlnet = build_controlnet(config, control_channels(len(organs), config.control_encoding))
        controlnet = load_weights_into(controlnet, model_dir / "controlnet.safetensors")
        vae = load_weights_into(build_image_vae(config), model_dir / "vae.safetensors")
        vae, unet, controlnet = [network.to(device).eval().requires_grad_(False) for network in (vae, unet, controlnet)]
        prompts = {modality: Prompt(**fields) for modality, fields in document["prompts"].items()}
        return cls(document, config, vae, unet, prompt_encoder, controlnet, float(document["scale_factor"]), organs, prompts,
                   tuple(document["grid_shape"]), torch.tensor(document["affine"], dtype=torch.float64))

    def prompt(self, modality: str) -> Prompt:
        """The training prompt of ``modality``; :class:`BadInputError` listing the known ones otherwise."""
        if modality not in self.prompts:
            raise BadInputError(f"The model does not know the modality {modality!r}; it was trained on {sorted(self.prompts)}.")
        return self.prompts[modality]

    def checked_mask(self, label: torch.Tensor, what: str) -> MetaTensor:
        """``label`` ``(1, I, J, K)`` as a MetaTensor after checking that it holds whole organ values of the model.

        A plain tensor is taken to lie on the training grid, so it must have the grid's shape (another grid needs
        its affine, a MetaTensor, to be resampled).

        Raises:
            BadInputError: not one label map ``(1, I, J, K)``, non-integer values, values that are not organs of the
                model, or a plain tensor off the grid.
        """
        values = label.as_tensor() if isinstance(label, MetaTensor) else torch.as_tensor(label)
        if values.ndim != 4 or values.shape[0] != 1:
            raise BadInputError(f"{what} has shape {tuple(values.shape)}; a mask is one label map (1, I, J, K).")
        if not holds_whole_numbers(values):
            raise BadInputError(f"{what} holds non-integer values; a mask holds whole label values (0 = background).")
        found = sorted({int(v) for v in torch.unique(values).tolist()} - {0})
        unknown = [value for value in found if not 1 <= value <= len(self.organs)]
        if unknown:
            known = {organ.value: organ.name for organ in self.organs}
            raise BadInputError(
                f"{what} holds label values {unknown} that are not organs of the model (found {found}; the model knows "
                f"{known}). Remap the mask to the model's label values."
            )
        if isinstance(label, MetaTensor):
            return label
        if tuple(values.shape[1:]) != self.grid_shape:
            raise BadInputError(
                f"{what} is a plain tensor of shape {tuple(values.shape[1:])}, not the model grid {self.grid_shape}: give "
                "it as a MetaTensor with its affine (e.g. medgen.io.load_volume) so that it can be resampled."
            )
        return MetaTensor(values, affine=self.grid_affine)

    def to_model_grid(self, label: MetaTensor) -> tuple[MetaTensor, bool]:
        """The mask on the training grid's axis order, shape and spacing (axes permuted/flipped as the training cases
        were, :func:`medgen.synthesis.prepare.prepare_pairs`, then nearest neighbour, centred pad/crop);
        ``(mask, True)`` when it had to be changed."""
        spacing = self.grid_affine[:3, :3].norm(dim=0)
        own_spacing = torch.as_tensor(label.affine, dtype=torch.float64)[:3, :3].norm(dim=0)
        codes = axis_codes(self.grid_affine)
        if (tuple(label.shape[1:]) == self.grid_shape and torch.allclose(own_spacing, spacing, rtol=1e-3)
                and axis_codes(label.affine) == codes):
            return label, False
        resampled = Spacing(pixdim=spacing.tolist(), mode="nearest")(oriented(label.float(), codes))
        resampled = ResizeWithPadOrCrop(self.grid_shape)(resampled)
        return MetaTensor(resampled.as_tensor().round().long(), affine=resampled.affine), True

    @staticmethod
    def covered_part(label: MetaTensor, grid_label: MetaTensor) -> MetaTensor:
        """The part of ``label``'s grid that ``grid_label``'s grid covers: ``label`` cropped to the voxels whose
        centres lie within the model grid's voxel extent (its affine follows the crop), or ``label`` itself when it
        is covered whole. Images resampled back from the model grid are only generated there; beyond it they would
        repeat the edge voxels."""
        grid_shape = torch.tensor(grid_label.shape[1:], dtype=torch.float64)
        corners = torch.tensor(list(itertools.product((0.0, 1.0), repeat=3)), dtype=torch.float64) * grid_shape - 0.5
        to_label = torch.linalg.inv(torch.as_tensor(label.affine, dtype=torch.float64)) @ torch.as_tensor(
            grid_label.affine, dtype=torch.float64)
        in_label = corners @ to_label[:3, :3].T + to_label[:3, 3]
        size = torch.tensor(label.shape[1:])
        start = torch.ceil(in_label.min(dim=0).values - 1e-3).long().clamp(0, None)
        stop = torch.minimum(torch.floor(in_label.max(dim=0).values + 1e-3).long() + 1, size)
        if bool((start == 0).all() and (stop == size).all()):
            return label
        return SpatialCrop(roi_start=start.tolist(), roi_end=stop.tolist())(label)

    def vanished_organs(self, label: MetaTensor, grid_label: MetaTensor) -> list[str]:
        """Organs of ``label`` with no voxel left in ``grid_label`` (cropped off the model's field of view, or
        smaller than one of its voxels)."""
        present = {int(v) for v in torch.unique(label.as_tensor()).tolist()} - {0}
        kept = {int(v) for v in torch.unique(grid_label.as_tensor()).tolist()}
        return [organ.name for organ in self.organs if organ.value in present - kept]


def guided_denoiser(model: MaskGenModel, control: torch.Tensor, context: torch.Tensor, empty_context: torch.Tensor,
                    guidance_scale: float, conditioning_scale: float = 1.0):
    """MRGen's CFG denoiser: ControlNet + UNet on both branches, the empty-prompt context as the unconditional one.

    At scale 1 (0) only the conditional (unconditional) branch runs, as diffusers skips CFG; otherwise both
    branches run as one doubled batch (:func:`medgen.diffusion.batched_cfg_denoiser`, as MONAI's inferer does).

    Args:
        control: ``(B, C_ctrl, I, J, K)`` at image resolution; context, empty_context: ``(1, L, E)``.
    """
    batch = control.shape[0]

    def branch(branch_control: torch.Tensor, branch_context: torch.Tensor):
        return controlnet_denoiser(model.unet, model.controlnet, branch_control, branch_context, conditioning_scale)

    if guidance_scale in (0.0, 1.0):
        return branch(control, (context if guidance_scale == 1.0 else empty_context).expand(batch, -1, -1))
    both = branch(torch.cat([control, control]), torch.cat([empty_context.expand(batch, -1, -1), context.expand(batch, -1, -1)]))
    return batched_cfg_denoiser(both, guidance_scale)


def generate_on_model_grid(
    model: MaskGenModel, label: torch.Tensor, prompt: Prompt, *, count: int = 20, chunk: int = 10, steps: int = 50,
    guidance_scale: float = 7.0, conditioning_scale: float = 1.0, seed: int = 0, device: torch.device | str = "cpu",
    reporter: Reporter | None = None,
) -> torch.Tensor:
    """``count`` candidates ``(count, 1, I, J, K)`` in [0, 1] (CPU) for a label map already on the model grid."""
    if count < 1 or chunk < 1:
        raise BadInputError(f"count and chunk must be >= 1; got count={count}, chunk={chunk}.")
    reporter = as_reporter(reporter)
    device = torch.device(device)
    control = control_tensor(label, len(model.organs), model.config.control_encoding).to(device)[None]
    with torch.no_grad():
        context = model.prompt_encoder.encode_prompts([prompt]).to(device)
        empty_context = model.prompt_encoder.encode_prompts([Prompt.empty()]).to(device)  # the true "" embedding (spec B.5)
    generator = torch.Generator(device=device).manual_seed(seed)
    latent_shape = tuple(model.document["latent_shape"])
    candidates = []
    for start in range(0, count, chunk):
        size = min(chunk, count - start)
        scheduler, timesteps = sampling_scheduler(model.config, steps)
        noise = torch.randn((size, *latent_shape), generator=generator, device=device)
        controls = control.expand(size, *control.shape[1:])
        denoise = guided_denoiser(model, controls, context, empty_context, guidance_scale, conditioning_scale)
        z = sample(denoise, scheduler, noise, timesteps=timesteps, generator=generator, reporter=reporter, phase="denoising")
        with torch.no_grad():
            candidates.append(model.vae.decode(z / model.scale_factor).clamp(0.0, 1.0).cpu())
        reporter.progress("candidates", start + size, count)
    return torch.cat(candidates)


def _to_mask_grid(images: torch.Tensor, grid_label: MetaTensor, label: torch.Tensor) -> torch.Tensor:
    """Candidates ``(B, 1, ...)`` on ``grid_label``'s grid resampled (trilinear) onto ``label``'s grid."""
    resampled = SpatialResample(mode="bilinear", padding_mode="border")(
        MetaTensor(images[:, 0], affine=grid_label.affine), dst_affine=torch.as_tensor(label.affine), spatial_size=tuple(label.shape[1:]),
    )
    return convert_to_tensor(resampled, track_meta=False).float()[:, None].clamp(0.0, 1.0)


def generate_candidates(
    model_dir: str | os.PathLike, label: torch.Tensor, prompt: Prompt, *, count: int = 20, chunk: int = 10, steps: int = 50,
    guidance_scale: float = 7.0, conditioning_scale: float = 1.0, seed: int = 0, device: torch.device | str = "cpu",
    reporter: Reporter | None = None, prompt_encoder: PromptEncoder | None = None,
) -> torch.Tensor:
    """Render ``count`` images of the mask ``label`` in ``prompt``'s modality.

    Args:
        model_dir: folder written by :func:`medgen.synthesis.maskgen_training.train_maskgen`.
        label: integer label map ``(1, I, J, K)`` (MetaTensor: its affine is used), values organs of the model.
            A mask on another grid is resampled (nearest) to the model's shape and spacing, and the images are
            resampled back (trilinear), so they always lie on the mask's grid; where that grid reaches beyond the
            model's field of view they repeat the edge voxels (:func:`synthesize_from_masks` crops its pairs to
            :meth:`MaskGenModel.covered_part`).
        prompt: e.g. the model's target prompt (``MaskGenModel.prompt(modality)``).
        count, chunk: candidates, and how many are denoised at once (bounds memory).
        steps: DDIM steps at MRGen's timesteps (981, 961, ..., 1 for 50).
        guidance_scale: CFG scale against the empty prompt (1 = conditional only, 0 = unconditional only).
        conditioning_scale: ControlNet residual multiplier (both CFG branches).
        seed: seeds the starting noise of all candidates.
        prompt_encoder: the text model of a folder trained with one (see :meth:`MaskGenModel.load`).

    Returns:
        float ``(count, 1, I, J, K)`` in [0, 1] on the mask's grid (CPU).
    """
    reporter = as_reporter(reporter)
    model = MaskGenModel.load(model_dir, device, prompt_encoder)
    label = model.checked_mask(label, "The mask")
    grid_label, resampled = model.to_model_grid(label)
    if resampled:
        reporter.log(f"The mask {tuple(label.shape[1:])} was resampled (nearest) to the model grid {model.grid_shape}.")
    images = generate_on_model_grid(model, grid_label, prompt, count=count, chunk=chunk, steps=steps, guidance_scale=guidance_scale,
                                    conditioning_scale=conditioning_scale, seed=seed, device=device, reporter=reporter)
    return _to_mask_grid(images, grid_label, label) if resampled else images


def mask_seed(seed: int, index: int) -> int:
    """The seed of the candidates of mask number ``index`` in a run seeded ``seed``: a hash of both, in [0, 2**63).
    ``seed + index`` made nearby runs repeat each other (seed 1's first mask drew seed 0's second mask's noise), so a
    new seed, meant to give new candidates, could give the same ones."""
    digest = hashlib.sha256(f"medgen-maskgen:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclasses.dataclass
class MaskResult:
    """What happened to one conditioning mask: ``status`` is ``accepted``, ``none accepted``, ``skipped: empty mask``,
    ``skipped: organs outside the model grid``, ``skipped: <organs> outside the model grid`` (organs of the mask
    with no voxel left on the model grid) or ``skipped: organs too small on the model grid`` (at most
    ``MASK_THRESHOLD`` of its voxels)."""

    mask_id: str
    status: str
    scores: list[CandidateScore] = dataclasses.field(default_factory=list)
    decision: FilterDecision | None = None
    pairs: list[tuple[Path, Path]] = dataclasses.field(default_factory=list)
    seed: int | None = None  # of its candidates' noise (None: skipped, nothing generated)

    def to_dict(self) -> dict:
        accepted = {score.candidate for score in self.decision.accepted} if self.decision else set()
        rejected = self.decision.rejected if self.decision else {}
        return {
            "mask_id": self.mask_id, "status": self.status, "seed": self.seed, "path": self.decision.path if self.decision else None,
            "candidates": [{**score.to_dict(), "decision": "accepted" if score.candidate in accepted else "rejected",
                            "reason": rejected.get(score.candidate, "")} for score in self.scores],
            "pairs": [{"image": image.name, "label": label.name} for image, label in self.pairs],
        }


@dataclasses.dataclass
class MaskGenReport:
    """All masks of a :func:`synthesize_from_masks` run; ``report_path`` is its ``report.json``."""

    masks: list[MaskResult]
    report_path: Path

    @property
    def pairs(self) -> list[tuple[Path, Path]]:
        return [pair for mask in self.masks for pair in mask.pairs]


def _write_report(path: Path, settings: dict, results: list[MaskResult]) -> None:
    document = {**settings, "masks": [result.to_dict() for result in results],
                "accepted_pairs": sum(len(result.pairs) for result in results)}
    write_text_atomic(path, json.dumps(document, indent=2) + "\n")


def _checker_of_folder(folder: Path, model: "MaskGenModel", device) -> nn.Module:
    """The checker in ``folder``: one written by ``maskgen-train`` (``checker/``), or a MedGen segmentation model folder
    (``model.json`` + weights, e.g. a source-modality segmenter) whose classes include the model's organs.

    Raises:
        ModelError: neither kind of folder.
    """
    names = [organ.name for organ in model.organs]
    if (folder / MODEL_JSON).is_file():
        return load_checker(folder, device, organ_names=names)
    if (folder / SPEC_FILE).is_file():
        segmenter = load_segmentation_model(str(folder))
        segmenter.network.to(device).eval()
        return SegmentationModelChecker(segmenter, names, model.grid_affine)
    raise ModelError(f"No checker in {folder}: pass the checker/ folder of a maskgen-train model ({MODEL_JSON}) or a MedGen "
                     f"segmentation model folder ({SPEC_FILE} + weights) whose classes include the organs {names}.")


def synthesize_from_masks(
    model_dir: str | os.PathLike,
    masks: Sequence[tuple[str, torch.Tensor]],
    out_dir: str | os.PathLike,
    *,
    target_modality: str | None = None,
    target_prompt: Prompt | None = None,
    candidates: int = 20,
    chunk: int = 10,
    steps: int = 50,
    guidance_scale: float = 7.0,
    conditioning_scale: float = 1.0,
    thresholds: FilterThresholds = FilterThresholds(),
    checker: nn.Module | str | os.PathLike | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    reporter: Reporter | None = None,
    report_path: str | os.PathLike | None = None,
    prompt_encoder: PromptEncoder | None = None,
) -> MaskGenReport:
    """MRGen's data engine: per mask generate candidates, score them with the checker, keep the accepted ones.

    Accepted pairs are written as they are accepted (``{mask_id}_{k}_image.nii.gz`` on the mask's grid and
    ``{mask_id}_{k}_label.nii.gz`` = the conditioning mask, k the candidate index; a mask reaching beyond the
    model's field of view gives pairs on the part of its grid the model covers, :meth:`MaskGenModel.covered_part`),
    with ``labels.json`` and ``report.json`` (every candidate's scores and decision, each mask's status) rewritten
    after every mask,
    so a cancelled run keeps a consistent folder. A mask without organ voxels, or whose organs cover at most
    ``MASK_THRESHOLD`` of the model grid, is skipped; a mask with no accepted candidate is reported, not an error.

    Args:
        model_dir: folder written by :func:`medgen.synthesis.maskgen_training.train_maskgen`.
        masks: ``(mask_id, label (1, I, J, K))``; ids are unique file-name stems.
        out_dir: output folder.
        target_modality, target_prompt: the modality to render (a modality of the model) or an explicit prompt.
        candidates, chunk, steps, guidance_scale, conditioning_scale: see :func:`generate_candidates`; mask ``i``
            uses seed :func:`mask_seed` ``(seed, i)``, recorded in the report.
        thresholds: acceptance settings (:class:`FilterThresholds`).
        checker: a checker module, or a folder: a maskgen-train checker or a MedGen segmentation model folder (see
            :func:`_checker_of_folder`); None uses the model's own ``checker/``.
        report_path: where ``report.json`` goes (default ``out_dir/report.json``).
        prompt_encoder: the text model of a folder trained with one (see :meth:`MaskGenModel.load`).
    """
    reporter = as_reporter(reporter)
    out_dir = Path(out_dir)
    report_path = Path(report_path) if report_path is not None else out_dir / "report.json"
    model = MaskGenModel.load(model_dir, device, prompt_encoder)
    if (target_modality is None) == (target_prompt is None):
        raise BadInputError("Give exactly one of target_modality and target_prompt.")
    prompt = target_prompt or model.prompt(target_modality)
    ids = [mask_id for mask_id, _ in masks]
    if len(set(ids)) != len(ids) or any(not mask_id or "/" in mask_id or "\\" in mask_id for mask_id in ids):
        raise BadInputError(f"Mask ids must be unique, non-empty file-name stems; got {ids}.")
    too_long = [mask_id for mask_id in ids if len(mask_id.encode()) > MAX_MASK_ID_BYTES]
    if too_long:  # refused before any generation: the pair files are named "<id>_<k>_image.nii.gz"
        raise BadInputError(f"Mask file names longer than {MAX_MASK_ID_BYTES} bytes cannot name their pairs: {too_long}. "
                            "Rename those mask files.")
    masks = [(mask_id, model.checked_mask(label, f"Mask {mask_id!r}")) for mask_id, label in masks]
    names = [organ.name for organ in model.organs]
    if not isinstance(checker, nn.Module):
        checker = _checker_of_folder(Path(checker) if checker is not None else Path(model_dir) / CHECKER_DIR, model, device)
    save_labels(model.organs, out_dir / "labels.json")
    settings = {"model": str(model_dir), "prompt": prompt.text(), "candidates": candidates, "steps": steps,
                "guidance_scale": guidance_scale, "conditioning_scale": conditioning_scale, "seed": seed,
                "thresholds": dataclasses.asdict(thresholds)}
    results: list[MaskResult] = []
    for index, (mask_id, label) in enumerate(masks):
        reporter.check_cancelled()
        grid_label, resampled = model.to_model_grid(label)
        if resampled:
            reporter.log(f"Mask {mask_id!r} {tuple(label.shape[1:])} was resampled (nearest) to the model grid {model.grid_shape}.")
        # MRGen's rule (spec B.5 step 1) is about the mask the generator sees: the fraction on the model grid, not on
        # the mask's own field of view (a large one would dilute organs that fill the model grid well)
        if foreground_fraction(label) == 0:
            reporter.log(f"Mask {mask_id!r} skipped: it holds no organ voxel.", "warning")
            results.append(MaskResult(mask_id, "skipped: empty mask"))
        elif foreground_fraction(grid_label) == 0:
            reporter.log(
                f"Mask {mask_id!r} skipped: on the model grid {model.grid_shape} (its spacing, cropped around the mask's "
                "centre) no voxel is organ: the organs lie outside the model's field of view. Crop the mask around its "
                "organs first.", "warning")
            results.append(MaskResult(mask_id, "skipped: organs outside the model grid"))
        elif vanished := model.vanished_organs(label, grid_label):
            reporter.log(
                f"Mask {mask_id!r} skipped: its organs {vanished} have no voxel on the model grid {model.grid_shape} (cropped "
                "around the mask's centre, or smaller than one voxel at the model's spacing), so no image could show them. "
                "Crop the mask around its organs first.", "warning")
            results.append(MaskResult(mask_id, f"skipped: {', '.join(vanished)} outside the model grid"))
        elif (fraction := foreground_fraction(grid_label)) <= MASK_THRESHOLD:
            reporter.log(
                f"Mask {mask_id!r} skipped: its organs cover {fraction:.2%} of the model grid {model.grid_shape}, at most "
                f"{MASK_THRESHOLD:.1%}: too little to condition on (MRGen skips such masks).", "warning")
            results.append(MaskResult(mask_id, "skipped: organs too small on the model grid"))
        else:
            candidate_seed = mask_seed(seed, index)
            images = generate_on_model_grid(model, grid_label, prompt, count=candidates, chunk=chunk, steps=steps,
                                            guidance_scale=guidance_scale, conditioning_scale=conditioning_scale,
                                            seed=candidate_seed, device=device, reporter=reporter)
            scores = score_candidates(checker, images, grid_label, names, mask_id=mask_id)
            decision = select_candidates(scores, thresholds)
            result = MaskResult(mask_id, "accepted" if decision.accepted else "none accepted", scores, decision,
                                seed=candidate_seed)
            pair_label = model.covered_part(label, grid_label) if resampled else label
            if decision.accepted and pair_label is not label:
                reporter.log(
                    f"Mask {mask_id!r} {tuple(label.shape[1:])} reaches beyond the model's field of view: its pairs hold "
                    f"only the {tuple(pair_label.shape[1:])} voxels the images were generated for.", "warning")
            for score in decision.accepted:
                image = images[score.candidate : score.candidate + 1]
                image = _to_mask_grid(image, grid_label, pair_label) if resampled else image
                stem = out_dir / f"{mask_id}_{score.candidate}"
                result.pairs.append((
                    save_volume(MetaTensor(image[0], affine=pair_label.affine), f"{stem}_image.nii.gz"),
                    save_volume(MetaTensor(pair_label.as_tensor().long(), affine=pair_label.affine), f"{stem}_label.nii.gz",
                                label=True),
                ))
            reporter.log(f"Mask {mask_id!r}: {len(decision.accepted)} of {candidates} candidate(s) accepted ({decision.path}).")
            results.append(result)
        _write_report(report_path, settings, results)
        reporter.progress("masks", index + 1, len(masks))
    return MaskGenReport(results, report_path)
