"""DIFF-3-style paired synthesis: joint VAE -> latent export -> latent DDPM -> DDIM sampling + decoding.

Training runs in three resumable stages under one folder (``vae/``, ``latents.safetensors``,
``ldm/``); a stage whose output exists is skipped, and an interrupted stage continues from its last
checkpoint. The finished model folder holds ``medgen_model.json``, ``vae.safetensors``,
``ldm.safetensors`` (EMA weights) and ``latents.safetensors``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from monai.utils import convert_to_tensor

from medgen.diffusion import (
    SIGMOID_SCHEDULE,
    TrainConfig,
    capped_batch_size,
    check_ddim_steps,
    noise_prediction_loss,
    sample,
    strided_timesteps,
    train_diffusion,
    unet_denoiser,
)
from medgen.errors import BadInputError
from medgen.io import save_volume
from medgen.io.model_folder import check_same_run, model_config, read_model_json, write_model_json
from medgen.labels import LabelInfo, save_labels
from medgen.models.weights import load_weights_into, read_safetensors, weights_hash, write_safetensors
from medgen.progress import PhaseReporter, Reporter, as_reporter
from medgen.synthesis.joint_vae import JointVAEConfig, build_joint_vae, decode_pair, joint_input, joint_vae_loss
from medgen.synthesis.latents import LatentSet, encode_posteriors
from medgen.synthesis.prepare import PreparedPair, check_common_grid

TASK = "joint-image-label-ldm"
#: what generation reads from a model folder's ``medgen_model.json`` besides ``config`` (name -> JSON type)
MODEL_FIELDS = {"num_classes": int, "labels": list, "affine": list}


@dataclasses.dataclass
class JointLDMConfig:
    """Settings of the joint model (defaults: the DIFF-3 recipe; :meth:`tiny` for CPU demos and tests).

    Args:
        vae_channels, vae_res_blocks, vae_norm_groups, vae_attention: joint VAE architecture.
        ldm_channels, ldm_attention, ldm_res_blocks, ldm_norm_groups: latent UNet architecture.
        vae_phase1_steps, vae_phase2_steps: optimiser steps with w_KL = 1e-6, then w_KL = 1 (C.3).
        ldm_steps: latent DDPM optimiser steps.
        vae_lr, ldm_lr: Adam learning rates (C.3: 1e-4 with betas (0.5, 0.9); C.5: 8e-5 with (0.9, 0.99)).
        batch_size: VAE micro-batch of both phases (C.3 uses 2, then 1; one value here, 1 for GPU memory at full size).
        ldm_batch_size: latent DDPM micro-batch (C.5: 64, capped at the number of training cases).
        grad_accum_steps, amp: as in :class:`medgen.diffusion.TrainConfig` (C.5: accumulation 2).
        ema_decay, ema_every: LDM EMA (C.5: 0.995 every 10 steps).
        num_train_timesteps: diffusion steps T (sigmoid schedule).
        checkpoint_every: steps between checkpoints.
    """

    vae_channels: tuple[int, ...] = (32, 64, 128, 128)
    vae_res_blocks: int = 2
    vae_norm_groups: int = 32
    vae_attention: bool = True
    ldm_channels: tuple[int, ...] = (64, 128, 256)
    ldm_attention: tuple[bool, ...] = (False, False, True)
    ldm_res_blocks: int = 2
    ldm_norm_groups: int = 32
    vae_phase1_steps: int = 20000
    vae_phase2_steps: int = 20000
    ldm_steps: int = 50000
    vae_lr: float = 1e-4
    ldm_lr: float = 8e-5
    batch_size: int = 1
    ldm_batch_size: int = 64
    grad_accum_steps: int = 2
    amp: bool = True
    ema_decay: float = 0.995
    ema_every: int = 10
    num_train_timesteps: int = 1000
    checkpoint_every: int = 1000

    @classmethod
    def tiny(cls, **overrides) -> "JointLDMConfig":
        """A few-minute CPU configuration (small widths, few steps) for demos and tests."""
        settings = dict(
            vae_channels=(8, 16, 16, 16), vae_res_blocks=1, vae_norm_groups=4, vae_attention=False,
            ldm_channels=(16, 32), ldm_attention=(False, False), ldm_res_blocks=1, ldm_norm_groups=8,
            vae_phase1_steps=60, vae_phase2_steps=20, ldm_steps=80, vae_lr=2e-3, ldm_lr=1e-3,
            ldm_batch_size=1, grad_accum_steps=1, ema_decay=0.9, ema_every=1, checkpoint_every=20,
        )
        settings.update(overrides)
        return cls(**settings)

    def vae_config(self, num_classes: int) -> JointVAEConfig:
        return JointVAEConfig(num_classes, tuple(self.vae_channels), 4, self.vae_res_blocks, self.vae_norm_groups, self.vae_attention)


def build_latent_unet(config: JointLDMConfig) -> DiffusionModelUNet:
    """MONAI ``DiffusionModelUNet`` on 4-channel latents (epsilon prediction)."""
    return DiffusionModelUNet(
        spatial_dims=3, in_channels=4, out_channels=4, channels=tuple(config.ldm_channels),
        attention_levels=tuple(config.ldm_attention), num_res_blocks=config.ldm_res_blocks,
        norm_num_groups=config.ldm_norm_groups, num_head_channels=8,
    )


def training_scheduler(config: JointLDMConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, schedule=SIGMOID_SCHEDULE, clip_sample=True)


def _vae_stage(vae, pairs, config: JointLDMConfig, run_dir: Path, device, reporter, seed: int) -> None:
    images = torch.stack([pair.image.as_tensor() for pair in pairs])
    labels = torch.stack([pair.label.as_tensor() for pair in pairs])
    dataset = list(range(len(pairs)))
    batch_size = capped_batch_size(config.batch_size, len(pairs), reporter, "training cases")
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.vae_lr, betas=(0.5, 0.9))
    for kl_weight, max_steps in ((1e-6, config.vae_phase1_steps), (1.0, config.vae_phase1_steps + config.vae_phase2_steps)):

        def vae_loss(model, batch, kl_weight=kl_weight):
            batch = batch.cpu()  # indices arrive on the model's device; the volumes stay on the CPU
            image, label = images[batch].to(device), labels[batch].to(device)
            reconstruction, mu, sigma = model(joint_input(image, label))
            return joint_vae_loss(reconstruction, image, label, mu, sigma, kl_weight).total

        train_diffusion(
            vae, vae_loss, dataset, optimizer,
            TrainConfig(max_steps=max_steps, batch_size=batch_size, grad_accum_steps=config.grad_accum_steps,
                        amp=config.amp, checkpoint_every=config.checkpoint_every, keep_checkpoints=1, seed=seed),
            checkpoint_dir=run_dir / "vae",
            reporter=PhaseReporter(reporter, "vae", total=config.vae_phase1_steps + config.vae_phase2_steps),  # both phases, one bar
        )


def train_joint_ldm(
    pairs: list[PreparedPair],
    labels: list[LabelInfo],
    out_dir: str | os.PathLike,
    config: JointLDMConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    reporter: Reporter | None = None,
    seed: int = 0,
) -> Path:
    """Train the joint VAE and the latent DDPM on prepared pairs; returns the model folder.

    Args:
        pairs: training pairs on one grid (see :func:`medgen.synthesis.prepare.prepare_pairs`), labels 0..K-1.
        labels: names/colours of label values 1..K-1.
        out_dir: model folder; an existing partial run there is resumed stage by stage.
        config: architecture and schedule (default: the DIFF-3 recipe).
        device: training device.
        reporter: progress per stage (``vae``, ``latents``, ``ldm``) and cancellation.
        seed: seeds each network's initial weights and each stage's training draws (batches, noise, timesteps).
    """
    config = config or JointLDMConfig()
    reporter = as_reporter(reporter)
    device = torch.device(device)
    out_dir = Path(out_dir)
    num_classes = len(labels) + 1
    if len(pairs) < 2:
        reporter.log("Only one training case: the model can only learn to reproduce it.", "warning")
    present = {int(value) for pair in pairs for value in torch.unique(pair.label).tolist()}
    if not present - {0}:
        raise BadInputError("No training label map holds a labelled voxel (every voxel is background 0): the model learns "
                            "images and labels together, so give the label maps that go with the images.")
    absent = [label.name for label in labels if label.value not in present]
    if absent:
        reporter.log(f"Labels {absent} occur in no training label map: the model will never generate them.", "warning")
    shape = check_common_grid(pairs, config.vae_config(num_classes).downsample_factor, len(config.ldm_channels))
    if max(int(pair.label.max()) for pair in pairs) >= num_classes:
        raise BadInputError(f"Label values must lie in 0..{num_classes - 1} ({len(labels)} named labels).")

    tensors = {f"{index}.{part}": getattr(pair, part) for index, pair in enumerate(pairs) for part in ("image", "label")}
    tensors.update({f"{index}.affine": pair.image.affine for index, pair in enumerate(pairs)})
    check_same_run(out_dir, {**dataclasses.asdict(config), "labels": [dataclasses.asdict(label) for label in labels],
                             "seed": seed},
                   weights_hash({name: convert_to_tensor(tensor, track_meta=False) for name, tensor in tensors.items()}),
                   may_change=("ldm_steps", "ema_decay", "ema_every", "checkpoint_every"), added_later={"seed": 0})
    torch.manual_seed(seed)  # each network's initial weights from the seed alone, whichever stages ran before
    vae = build_joint_vae(config.vae_config(num_classes)).to(device)
    _vae_stage(vae, pairs, config, out_dir, device, reporter, seed)
    vae.eval()

    latents_path = out_dir / "latents.safetensors"
    if not latents_path.exists():
        reporter.progress("latents", 0, len(pairs))
        inputs = torch.stack([joint_input(pair.image.as_tensor()[None], pair.label.as_tensor()[None])[0] for pair in pairs])
        mu, sigma = encode_posteriors(vae, inputs.to(device))
        write_safetensors(LatentSet.from_posteriors(mu, sigma).state(), latents_path)
        reporter.progress("latents", len(pairs), len(pairs))
    latents = LatentSet.from_state(read_safetensors(latents_path))

    torch.manual_seed(seed)
    unet = build_latent_unet(config).to(device)
    scheduler = training_scheduler(config)

    def ldm_loss(model, batch):
        x0 = latents.draw(batch).to(device)  # dynamic sampling from torch's global RNG (bit-exact resume)
        return noise_prediction_loss(unet_denoiser(model), scheduler, x0, loss=F.l1_loss)

    result = train_diffusion(
        unet, ldm_loss, list(range(len(pairs))), torch.optim.Adam(unet.parameters(), lr=config.ldm_lr, betas=(0.9, 0.99)),
        TrainConfig(max_steps=config.ldm_steps, batch_size=capped_batch_size(config.ldm_batch_size, len(pairs), reporter, "training cases"),
                    grad_accum_steps=config.grad_accum_steps,
                    ema_decay=config.ema_decay, ema_every=config.ema_every, amp=config.amp,
                    checkpoint_every=config.checkpoint_every, keep_checkpoints=1, seed=seed),
        checkpoint_dir=out_dir / "ldm", reporter=PhaseReporter(reporter, "ldm"),
    )
    write_safetensors(vae.state_dict(), out_dir / "vae.safetensors")
    ldm_weights = result.ema_model if result.ema_model is not None else unet  # EMA weights for sampling
    write_safetensors(ldm_weights.state_dict(), out_dir / "ldm.safetensors")
    # the steps the weights had: a folder trained further before keeps its longer training
    trained_config = dataclasses.replace(config, ldm_steps=result.step)
    write_model_json(
        out_dir, TASK, config=dataclasses.asdict(trained_config), seed=seed, num_classes=num_classes,
        labels=[dataclasses.asdict(label) for label in labels], grid_shape=list(shape),
        affine=np.asarray(pairs[0].image.affine, dtype=float).tolist(), latent_shape=list(latents.mu.shape[1:]),
    )
    return out_dir


def _rebuild(model_dir: Path, device: torch.device):
    document = read_model_json(model_dir, TASK, MODEL_FIELDS)
    config = model_config(model_dir, document, JointLDMConfig, "paired-synthesis")
    vae = load_weights_into(build_joint_vae(config.vae_config(document["num_classes"])), model_dir / "vae.safetensors").to(device).eval()
    unet = load_weights_into(build_latent_unet(config), model_dir / "ldm.safetensors").to(device).eval()
    latents = LatentSet.from_state(read_safetensors(model_dir / "latents.safetensors"))
    labels = [LabelInfo.from_dict(e) for e in document["labels"]]
    return document, config, vae, unet, latents, labels


def generate_pairs(
    model_dir: str | os.PathLike,
    count: int,
    *,
    seed: int = 0,
    batch_size: int = 1,
    steps: int = 100,
    device: torch.device | str = "cpu",
    reporter: Reporter | None = None,
) -> Iterator[tuple[MetaTensor, MetaTensor]]:
    """Yield ``count`` generated (image, label) pairs, ``batch_size`` at a time (memory stays bounded).

    DDIM with ``steps`` steps (a divisor of T, so the chain starts at T-1) at timesteps ``T/steps - 1 + k*T/steps``
    (spec QC4: 999, 989, ..., 9 for 100 steps), eta 0, x0 clipped to [-1, 1]; the last step returns the model's x0
    estimate.
    Image: ``(1, I, J, K)`` in [0, 1]; label: int64 argmax. Both carry the training grid's affine.
    """
    if count < 0:
        raise BadInputError(f"The number of pairs must be >= 0; got {count}.")
    reporter = as_reporter(reporter)
    device = torch.device(device)
    model_dir = Path(model_dir)
    document, config, vae, unet, latents, _ = _rebuild(model_dir, device)
    check_ddim_steps(steps, config.num_train_timesteps)
    stride = config.num_train_timesteps // steps
    scheduler = DDIMScheduler(num_train_timesteps=config.num_train_timesteps, schedule=SIGMOID_SCHEDULE, clip_sample=True,
                              set_alpha_to_one=True, steps_offset=stride - 1)
    timesteps = strided_timesteps(config.num_train_timesteps, steps, offset=stride - 1)
    affine = torch.tensor(document["affine"], dtype=torch.float64)
    generator = torch.Generator(device=device).manual_seed(seed)
    made = 0
    while made < count:
        reporter.check_cancelled()
        batch = min(batch_size, count - made)
        noise = torch.randn((batch, *latents.mu.shape[1:]), generator=generator, device=device)
        normalised = sample(unet_denoiser(unet), scheduler, noise, timesteps=timesteps, generator=generator, reporter=reporter, phase="denoising")
        with torch.no_grad():
            images, labels = decode_pair(vae, latents.denormalize(normalised).to(device))
        for image, label in zip(images.cpu(), labels.cpu()):
            made += 1
            reporter.progress("pairs", made, count)
            yield MetaTensor(image, affine=affine), MetaTensor(label, affine=affine)


def write_generated_pairs(
    model_dir: str | os.PathLike,
    count: int,
    out_dir: str | os.PathLike,
    *,
    prefix: str = "syn",
    **generate_kwargs,
) -> list[tuple[Path, Path]]:
    """Generate pairs and write each as ``{prefix}_{n:04d}_image.nii.gz`` / ``_label.nii.gz`` (atomically,
    as it is made, so a cancelled run keeps every finished pair) plus ``labels.json``."""
    out_dir = Path(out_dir)
    document = read_model_json(model_dir, TASK, MODEL_FIELDS)
    save_labels([LabelInfo.from_dict(e) for e in document["labels"]], out_dir / "labels.json")
    written = []
    for index, (image, label) in enumerate(generate_pairs(model_dir, count, **generate_kwargs)):
        image_path = save_volume(image, out_dir / f"{prefix}_{index:04d}_image.nii.gz")
        label_path = save_volume(label, out_dir / f"{prefix}_{index:04d}_label.nii.gz", label=True)
        written.append((image_path, label_path))
    return written
