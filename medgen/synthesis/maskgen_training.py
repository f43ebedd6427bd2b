"""MRGen-style mask-conditioned synthesis in 3D (spec B.9), training side: the model folder that
:class:`medgen.synthesis.maskgen.MaskGenModel` loads.

Training runs resumable stages in one model folder: ``vae/`` (image VAE), ``latents.safetensors``
(posteriors + ``scale_factor`` = 1/std(z)), ``unet/`` (prompt-conditioned latent UNet trained jointly with
the learned prompt encoder on all images), ``checker/`` (the independent organ checker used for
filtering, trained on the source label maps only) and ``controlnet/`` (the ControlNet alone, on the mixed
set: source images with their masks, target images with the empty control, or with the checker's masks
when ``MaskGenConfig.target_pseudo_labels`` is set, an extension). A stage whose checkpoint has
reached its step count is skipped; an interrupted one continues. ``medgen_model.json`` is written last.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.utils import convert_to_tensor
from torch import nn

from medgen.diffusion import TrainConfig, capped_batch_size, controlnet_denoiser, noise_prediction_loss, train_diffusion
from medgen.errors import BadInputError
from medgen.io.model_folder import MODEL_JSON, check_same_run, write_model_json
from medgen.labels import LabelInfo, make_labels
from medgen.metrics import psnr
from medgen.models.weights import read_safetensors, weights_hash, write_safetensors
from medgen.progress import PhaseReporter, Reporter, as_reporter
from medgen.synthesis.checker import CheckerConfig, load_checker, save_checker, train_checker
from medgen.synthesis.latents import encode_posteriors
from medgen.synthesis.maskgen import CHECKER_DIR, TASK
from medgen.synthesis.maskgen_networks import (
    MaskGenConfig,
    PromptedUNet,
    build_controlnet,
    build_image_vae,
    build_latent_unet,
    image_vae_loss,
    training_scheduler,
)
from medgen.synthesis.masks import control_channels
from medgen.synthesis.prepare import check_common_grid
from medgen.synthesis.prompts import (
    LearnedPromptEncoder,
    Prompt,
    PromptEncoder,
    PromptVocabulary,
    TrainingSample,
    compose_training_set,
    drop_prompt,
)


def _train_config(config: MaskGenConfig, max_steps: int, num_samples: int, ema: bool, reporter) -> TrainConfig:
    return TrainConfig(
        max_steps=max_steps, batch_size=capped_batch_size(config.batch_size, num_samples, reporter, "training images"),
        grad_accum_steps=config.grad_accum_steps,
        grad_clip_norm=config.grad_clip_norm, ema_decay=config.ema_decay if ema else None, amp=config.amp,
        checkpoint_every=config.checkpoint_every, keep_checkpoints=1, seed=config.seed,
    )


def _organ_labels(organ_names: Sequence[str | LabelInfo]) -> list[LabelInfo]:
    """Organ ``j`` is label value ``j``: names become labels 1..N with default colours."""
    if all(isinstance(organ, LabelInfo) for organ in organ_names):
        labels = sorted(organ_names, key=lambda label: label.value)
        if [label.value for label in labels] != list(range(1, len(labels) + 1)):
            raise BadInputError(f"Organ label values must be 1..N; got {[label.value for label in labels]}.")
        return labels
    return make_labels([str(name) for name in organ_names])


def _vae_stage(images: torch.Tensor, config: MaskGenConfig, out_dir: Path, device, reporter) -> nn.Module:
    """Stage 1: the image VAE on every training image ``(N, 1, I, J, K)``; returns it frozen."""
    torch.manual_seed(config.seed)  # every stage's initial weights from the seed alone, whichever stages ran before
    vae = build_image_vae(config).to(device)
    train_diffusion(
        # the trainer hands the indices on the model's device; the images stay on the CPU
        vae, lambda model, batch: image_vae_loss(model, images[batch.cpu()].to(device), config), list(range(len(images))),
        torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=1e-2),
        _train_config(config, config.vae_steps, len(images), ema=False, reporter=reporter), checkpoint_dir=out_dir / "vae", reporter=PhaseReporter(reporter, "vae"),
    )
    vae.eval().requires_grad_(False)
    write_safetensors(vae.state_dict(), out_dir / "vae.safetensors")
    return vae


def reconstruction_psnr(vae: nn.Module, images: torch.Tensor, mu: torch.Tensor) -> float:
    """Mean PSNR (dB, data range 1) of the VAE's reconstructions of ``images`` ``(N, 1, I, J, K)``: their posterior
    means ``mu`` ``(N, C_lat, d, h, w)`` (the latent stage's, so nothing is encoded twice) decoded. Generated images
    are no sharper than this: on the toy fidelity bench 28 dB left the small organ at Dice 0.83 after decoding,
    32 dB at 0.96."""
    with torch.no_grad():
        return float(np.mean([psnr(vae.decode(z[None])[0].cpu(), image) for z, image in zip(mu, images)]))


#: spatial axes to flip together (0 = I, 1 = J, 2 = K); ``()`` is the identity
Flip = tuple[int, ...]


def flip_combinations(axes: Sequence[int]) -> list[Flip]:
    """All subsets of the spatial ``axes`` (0..2), the identity ``()`` first: ``(0, 2)`` -> ``[(), (0,), (2,), (0, 2)]``."""
    axes = sorted(axes)
    return [combination for size in range(len(axes) + 1) for combination in itertools.combinations(axes, size)]


def flip_spatial(volume: torch.Tensor, flip: Flip) -> torch.Tensor:
    """``volume`` ``(..., I, J, K)`` flipped along the spatial axes in ``flip`` (0 = I, 1 = J, 2 = K)."""
    return volume.flip([axis - 3 for axis in flip]) if flip else volume


@dataclasses.dataclass
class _LatentData:
    """What stages 2 and 3 draw from: the training samples, their posteriors ``(N, C_lat, d, h, w)`` and prompts;
    ``flipped`` maps each flip of :func:`flip_combinations` to the posteriors ``(mu, sigma)`` of the flipped images
    (the identity ``()`` to ``mu, sigma``)."""

    samples: list
    mu: torch.Tensor
    sigma: torch.Tensor
    scale_factor: float
    vocabulary: PromptVocabulary
    prompt_dropout: float
    flipped: dict[Flip, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.flipped = {(): (self.mu, self.sigma), **self.flipped}

    def draw_latents(self, batch: torch.Tensor, flips: Sequence[Flip]) -> torch.Tensor:
        """Fresh scaled latents ``(mu + sigma * eps) * scale_factor`` of sample ``batch[b]`` flipped by ``flips[b]``;
        eps from torch's global RNG (bit-exact resume)."""
        mu = torch.stack([self.flipped[flip][0][int(i)] for i, flip in zip(batch, flips)])
        sigma = torch.stack([self.flipped[flip][1][int(i)] for i, flip in zip(batch, flips)])
        return (mu + sigma * torch.randn(mu.shape, device=mu.device)) * self.scale_factor

    def random_flips(self, count: int, axes: Sequence[int]) -> list[Flip]:
        """``count`` flips drawn uniformly from :func:`flip_combinations` of ``axes`` (each axis flipped with
        probability 1/2) with torch's RNG; for no axes the identity, drawing nothing (so the RNG stream is MRGen's)."""
        combinations = flip_combinations(axes)
        if len(combinations) == 1:
            return [()] * count
        return [combinations[int(index)] for index in torch.randint(len(combinations), (count,))]

    def dropped_prompts(self, batch: torch.Tensor) -> list[Prompt]:
        """The batch's prompts, each replaced by the empty prompt with ``prompt_dropout``."""
        return [drop_prompt(self.samples[int(i)].prompt, self.prompt_dropout, None) for i in batch]


def _latent_stage(vae, images, samples, vocabulary, config: MaskGenConfig, out_dir: Path, device, reporter) -> _LatentData:
    """Encode every training image once (posterior mean and std) and fix ``scale_factor`` = 1/std(z); with
    flip axes (``config.unet_flip_axes``, ``config.controlnet_flip_axes``) also every flipped copy
    (``flipped_latents.safetensors``, one entry per flip of either stage)."""
    latents_path = out_dir / "latents.safetensors"
    if not latents_path.exists():
        reporter.progress("latents", 0, len(images))
        mu, sigma = encode_posteriors(vae, images.to(device))
        # spec B.9: the std of z drawn once from the training posteriors, not SD's 0.18215
        z = mu + sigma * torch.randn(mu.shape, generator=torch.Generator(device=mu.device).manual_seed(0), device=mu.device)
        write_safetensors({"mu": mu, "sigma": sigma, "scale_factor": 1.0 / z.std().reshape(1)}, latents_path)
        reporter.progress("latents", len(images), len(images))
    latents = read_safetensors(latents_path)
    all_flips = set(flip_combinations(config.unet_flip_axes)) | set(flip_combinations(config.controlnet_flip_axes))
    flips, flipped_path, flipped = sorted(all_flips - {()}), out_dir / "flipped_latents.safetensors", {}
    stored = read_safetensors(flipped_path) if flips and flipped_path.exists() else {}
    keys = {flip: "flip" + "".join(map(str, flip)) for flip in flips}
    missing = [flip for flip in flips if f"mu_{keys[flip]}" not in stored]
    for flip in missing:
        stored[f"mu_{keys[flip]}"], stored[f"sigma_{keys[flip]}"] = encode_posteriors(vae, flip_spatial(images, flip).to(device))
    if missing:  # written once: rewriting the growing file after every flip costs more I/O than re-encoding saves
        write_safetensors(stored, flipped_path)
    for flip in flips:
        flipped[flip] = (stored[f"mu_{keys[flip]}"].to(device), stored[f"sigma_{keys[flip]}"].to(device))
    return _LatentData(samples, latents["mu"].to(device), latents["sigma"].to(device), float(latents["scale_factor"]),
                       vocabulary, config.prompt_dropout, flipped)


def _unet_stage(
    data: _LatentData, config: MaskGenConfig, text_encoder: PromptEncoder | None, out_dir: Path, device, reporter
) -> PromptedUNet:
    """Stage 2: the latent UNet with the learned prompt encoder (jointly), or with ``text_encoder`` (frozen), on all
    images (flipped at random along ``config.unet_flip_axes``); returns the frozen EMA copy."""
    scheduler = training_scheduler(config)
    torch.manual_seed(config.seed)
    encoder = text_encoder or LearnedPromptEncoder(data.vocabulary, config.prompt_embedding_dim)
    prompted = PromptedUNet(build_latent_unet(config), encoder).to(device)

    def unet_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        prompts = data.dropped_prompts(batch)
        latents = data.draw_latents(batch, data.random_flips(len(batch), config.unet_flip_axes))
        return noise_prediction_loss(lambda x_t, t: model(x_t, t, prompts), scheduler, latents)

    result = train_diffusion(
        prompted, unet_loss, list(range(len(data.samples))),
        torch.optim.AdamW(prompted.parameters(), lr=config.unet_lr, weight_decay=1e-2),
        _train_config(config, config.unet_steps, len(data.samples), ema=True, reporter=reporter),
        checkpoint_dir=out_dir / "unet", reporter=PhaseReporter(reporter, "unet"),
    )
    prompted = (result.ema_model if result.ema_model is not None else prompted).eval().requires_grad_(False)
    write_safetensors(prompted.unet.state_dict(), out_dir / "unet.safetensors")
    if text_encoder is None:
        write_safetensors(prompted.prompt_encoder.state_dict(), out_dir / "prompt_encoder.safetensors")
    return prompted


def _controlnet_stage(
    data: _LatentData, prompted: PromptedUNet, num_organs: int, config: MaskGenConfig, out_dir: Path, device, reporter
) -> int:
    """Stage 3: the ControlNet alone (UNet and prompt encoder frozen) on the mixed source/target set; returns the
    steps its weights had (more than ``config.controlnet_steps`` when the folder was trained further before)."""
    scheduler = training_scheduler(config)
    # seeded here: on a resume the checker stage, which draws from the global generator, is skipped
    torch.manual_seed(config.seed)
    controlnet = build_controlnet(config, control_channels(num_organs, config.control_encoding), prompted.unet).to(device)

    def controlnet_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            context = prompted.prompt_encoder.encode_prompts(data.dropped_prompts(batch)).to(device)
        flips = data.random_flips(len(batch), config.controlnet_flip_axes)
        control = torch.stack([flip_spatial(data.samples[int(i)].control(config.control_encoding), flip)
                               for i, flip in zip(batch, flips)]).to(device)
        return noise_prediction_loss(controlnet_denoiser(prompted.unet, model, control, context), scheduler,
                                     data.draw_latents(batch, flips))

    result = train_diffusion(
        controlnet, controlnet_loss, list(range(len(data.samples))),
        torch.optim.AdamW(controlnet.parameters(), lr=config.controlnet_lr, weight_decay=1e-2),
        _train_config(config, config.controlnet_steps, len(data.samples), ema=True, reporter=reporter),
        checkpoint_dir=out_dir / "controlnet", reporter=PhaseReporter(reporter, "controlnet"),
    )
    write_safetensors((result.ema_model if result.ema_model is not None else controlnet).state_dict(), out_dir / "controlnet.safetensors")
    return result.step


def _checker_stage(sources, organ_names, config: MaskGenConfig, out_dir: Path, device, reporter) -> None:
    """The independent checker, from the source label maps (+ images) only, never the generator; trained
    before stage 3, which may use it for target pseudo-labels (``MaskGenConfig.target_pseudo_labels``)."""
    checker_config = CheckerConfig.tiny() if config.checker_preset == "tiny" else CheckerConfig()
    steps = checker_config.steps if config.checker_steps is None else config.checker_steps
    batch_size = capped_batch_size(checker_config.batch_size, len(sources), reporter, "source cases")
    checker_config = dataclasses.replace(checker_config, batch_size=batch_size, steps=steps, seed=config.seed)
    checker = train_checker(
        [sample.label for sample in sources], len(organ_names), checker_config, images=[sample.image for sample in sources],
        device=device, reporter=PhaseReporter(reporter, "checker"), checkpoint_dir=out_dir / "checker_checkpoints",
    )
    save_checker(checker, checker_config, len(organ_names), out_dir / CHECKER_DIR, organ_names=organ_names)


def pseudo_labelled_targets(samples: Sequence[TrainingSample], checker: nn.Module, device) -> list[TrainingSample]:
    """``samples`` with every target-modality sample given the checker's predicted label map ``(1, I, J, K)``
    (argmax over background + organs); source samples are returned unchanged."""
    labelled = []
    for training_sample in samples:
        if not training_sample.is_source:
            with torch.no_grad():
                image = convert_to_tensor(training_sample.image, track_meta=False)[None].float().to(device)
                label = checker(image)[0].argmax(0, keepdim=True)
            training_sample = dataclasses.replace(training_sample, label=label.cpu())
        labelled.append(training_sample)
    return labelled


def train_maskgen(
    source_cases: Sequence[tuple[torch.Tensor, torch.Tensor]],
    target_images: Sequence[torch.Tensor],
    organ_names: Sequence[str | LabelInfo],
    out_dir: str | os.PathLike,
    config: MaskGenConfig | None = None,
    *,
    source_prompt: Prompt,
    target_prompt: Prompt,
    prompt_encoder: PromptEncoder | None = None,
    device: torch.device | str = "cpu",
    reporter: Reporter | None = None,
) -> Path:
    """Train the mask-conditioned generator (and its checker); returns the model folder.

    Args:
        source_cases: source-modality ``(image (1, I, J, K) in [0, 1], label (1, I, J, K) int)`` on one grid;
            label value ``j`` = ``organ_names[j-1]``. Cases without any organ voxel are left out.
        target_images: target-modality images ``(1, I, J, K)`` in [0, 1] on the same grid (no labels).
        organ_names: the N organ names in label order (or :class:`LabelInfo` with values 1..N and colours).
        out_dir: model folder; a partial run there is resumed stage by stage.
        config: architecture and schedule (default :class:`MaskGenConfig`).
        source_prompt, target_prompt: prompts of the two modalities (their ``organs`` are set to the organ names).
        prompt_encoder: a frozen local text model (:class:`~medgen.synthesis.prompts.FrozenTextEncoder`) whose
            ``embedding_dim`` is ``config.prompt_embedding_dim``; None (default) trains a learned embedding table.
            The model folder records which; a text model must be given again to :meth:`medgen.synthesis.maskgen.MaskGenModel.load`.
        device: training device.
        reporter: progress per stage (``vae``, ``latents``, ``unet``, ``checker``, ``controlnet``) and cancellation.
    """
    config = config or MaskGenConfig()
    reporter = as_reporter(reporter)
    device = torch.device(device)
    out_dir = Path(out_dir)
    organs = _organ_labels(organ_names)
    names = tuple(organ.name for organ in organs)
    if source_prompt.modality == target_prompt.modality:
        raise BadInputError(f"Source and target modality must differ; both are {source_prompt.modality!r}.")
    present = {int(value) for _, label in source_cases for value in torch.unique(torch.as_tensor(label)).tolist()}
    unseen = [organ.name for organ in organs if organ.value not in present]
    if unseen:  # an empty segment or a name no label map uses: the model could never draw it, nor its checker score it
        raise BadInputError(f"Organs {unseen} have no voxel in any prepared source label map, so the model could not "
                            "learn them and masks holding them would never be accepted. They are empty segments, names "
                            "no label map uses (e.g. in dataset.json), or cut off by the crop to the model grid (then "
                            "give a voxel spacing); leave them out or add source cases that show them.")
    if prompt_encoder is not None and prompt_encoder.embedding_dim != config.prompt_embedding_dim:
        raise BadInputError(
            f"The text model's embedding width {prompt_encoder.embedding_dim} must equal the UNet's cross-attention "
            f"width prompt_embedding_dim={config.prompt_embedding_dim}; set that setting to {prompt_encoder.embedding_dim}."
        )
    source_prompt = dataclasses.replace(source_prompt, organs=names)
    target_prompt = dataclasses.replace(target_prompt, organs=names)
    samples = compose_training_set(source_cases, target_images, source_prompt, target_prompt)
    if len(samples) < len(source_cases) + len(target_images):
        reporter.log(f"{len(source_cases) + len(target_images) - len(samples)} source case(s) without any organ left out.", "warning")
    shape = check_common_grid(samples, config.downsample_factor, len(config.unet_channels))  # TrainingSample has .image like PreparedPair
    images = torch.stack([convert_to_tensor(sample.image, track_meta=False).float() for sample in samples])
    tensors = {"images": images, "affine": torch.as_tensor(getattr(source_cases[0][0], "affine", torch.eye(4)))}
    tensors.update({f"{index}.label": convert_to_tensor(sample.label, track_meta=False)
                    for index, sample in enumerate(samples) if sample.label is not None})
    prompts = [dataclasses.asdict(prompt) for prompt in (source_prompt, target_prompt)]
    encoder = "learned" if prompt_encoder is None else f"text {prompt_encoder.context_length}x{prompt_encoder.embedding_dim}"
    check_same_run(out_dir, {**dataclasses.asdict(config), "organs": [dataclasses.asdict(organ) for organ in organs],
                             "prompts": prompts, "prompt_encoder": encoder}, weights_hash(tensors),
                   may_change=("controlnet_steps", "ema_decay", "checkpoint_every"))

    vae = _vae_stage(images, config, out_dir, device, reporter)
    vocabulary = PromptVocabulary.from_prompts([source_prompt, target_prompt])
    data = _latent_stage(vae, images, samples, vocabulary, config, out_dir, device, reporter)
    vae_psnr_db = reconstruction_psnr(vae, images, data.mu)
    reporter.log(f"VAE reconstruction of the {len(images)} training images: {vae_psnr_db:.1f} dB PSNR (mean); "
                 "generated images are no sharper.")
    prompted = _unet_stage(data, config, prompt_encoder, out_dir, device, reporter)
    if config.train_checker and not (out_dir / CHECKER_DIR / MODEL_JSON).is_file():
        _checker_stage([sample for sample in samples if sample.is_source], names, config, out_dir, device, reporter)
    if config.target_pseudo_labels:
        checker = load_checker(out_dir / CHECKER_DIR, device)
        data = dataclasses.replace(data, samples=pseudo_labelled_targets(data.samples, checker, device))
    controlnet_steps = _controlnet_stage(data, prompted, len(organs), config, out_dir, device, reporter)

    first_image = source_cases[0][0]
    affine = first_image.affine if isinstance(first_image, MetaTensor) else torch.eye(4)
    write_model_json(
        out_dir, TASK, config=dataclasses.asdict(dataclasses.replace(config, controlnet_steps=controlnet_steps)), organs=[dataclasses.asdict(organ) for organ in organs],
        prompts={prompt.modality: dataclasses.asdict(prompt) for prompt in (source_prompt, target_prompt)},
        source_modality=source_prompt.modality, target_modality=target_prompt.modality,
        prompt_encoder=_encoder_record(prompted.prompt_encoder), scale_factor=data.scale_factor, grid_shape=list(shape),
        affine=np.asarray(affine, dtype=float).tolist(), latent_shape=list(data.mu.shape[1:]),
        vae_reconstruction_psnr_db=vae_psnr_db,
    )
    return out_dir


def _encoder_record(encoder: PromptEncoder) -> dict:
    """What ``medgen_model.json`` records of the prompt encoder: the learned table's settings (its weights are
    saved beside), or the context shape of a text model, which the folder does not hold."""
    if isinstance(encoder, LearnedPromptEncoder):
        return encoder.to_config()
    return {"kind": "text", "context_length": encoder.context_length, "embedding_dim": encoder.embedding_dim}
