"""LMI-conditioned DDPM for zero-shot modality translation (MIDiffusion, spec A.4/A.5/A.8), clean mode.

Training sees only target-modality volumes. The network input is ``[x_t, LMI(x0, x_{t+1}), LMI(x0, x0)]``
(x_{t+1} noised with the same epsilon, t+1 clamped to T-1). Translation starts from noise and, at every
step, recomputes ``LMI(S, x_t)`` from the current sample and the source S (``LMI(S, S)`` is cached); the
source never enters the network directly. ``mode="2.5d"`` trains a 2D network on axial slices (last axis)
and translates slice by slice, reusing the 2D operator; ``mode="3d"`` works on whole volumes. A model
with ``conditioned=False`` is the unconditional target-only DDPM used by the SDEdit baseline.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from medgen.diffusion import (
    TrainConfig,
    capped_batch_size,
    check_ddim_steps,
    dist_context_from_env,
    sample,
    sdedit,
    strided_timesteps,
    train_diffusion,
)
from medgen.errors import BadInputError
from medgen.io import check_not_constant, display_name, nearest_multiple_shape, scale_to_unit
from medgen.io.model_folder import check_same_run, model_config, read_model_json, write_model_json
from medgen.models.weights import load_weights_into, weights_hash, write_safetensors
from medgen.progress import Reporter, as_reporter
from medgen.translate.lmi import lmi_map

TASK = "lmi-translation"
#: 2.5d training drops axial slices whose largest scaled intensity is at most this (background only)
EMPTY_SLICE_MAX = 0.05


@dataclasses.dataclass
class TranslationConfig:
    """Settings of an LMI translation model.

    Args:
        mode: ``"2.5d"`` (2D network on axial slices) or ``"3d"``.
        grid: model grid in voxels along the model's axes (R, A, S with ``voxel_axes="ras"``); volumes are resized
            to it (2.5d: slices are the first two axes, as many as the third).
        voxel_axes: ``"ras"`` (default): volumes are laid out on RAS-ordered axes before they meet the network
            (:func:`ras_axes`); ``"storage"``: their storage order, as model folders written before this setting
            existed were trained (they lack it and load with it).
        conditioned: LMI-conditioned (MIDiffusion) or unconditional (SDEdit baseline).
        channels, attention_levels, num_res_blocks, norm_num_groups: network (spec A.8: (64,128,128,128), attention last).
        steps, batch_size, lr, ema_decay: training (spec A.4: Adam 3e-4, clip 1.0, EMA 0.9999).
        num_train_timesteps: T (linear beta 1e-4..0.02).
        lmi_window, lmi_radius, lmi_bins, lmi_normalize: LMI operator settings (one normalisation flag for both).
        lmi_compat: condition on the released LMI definition (``lmi_map(compat=True)``: quantised, zero padding,
            the released candidate windows) to match models trained with the released code; False (default) the
            clean operator. Training and sampling use the same.
        memory_budget_mb: LMI chunk budget. Clean mode with a budget too small for one plane falls back from box
            sums to gathers, whose summation order differs (LMI values within 1e-6).
    """

    mode: str = "2.5d"
    grid: tuple[int, int, int] = (128, 128, 64)
    conditioned: bool = True
    channels: tuple[int, ...] = (64, 128, 128, 128)
    attention_levels: tuple[bool, ...] = (False, False, False, True)
    num_res_blocks: int = 2
    norm_num_groups: int = 32
    steps: int = 20000
    batch_size: int = 4
    lr: float = 3e-4
    ema_decay: float | None = 0.9999
    num_train_timesteps: int = 1000
    lmi_window: int = 3
    lmi_radius: int = 1
    lmi_bins: int = 27
    lmi_normalize: bool = True
    lmi_compat: bool = False
    memory_budget_mb: float = 1024.0
    voxel_axes: str = "ras"

    @classmethod
    def tiny(cls, **overrides) -> "TranslationConfig":
        """Minutes on CPU: small widths and grid. 2,000 steps, because fewer learn no contrast: on the 2 mm sample brain
        (T1 training, PD translated, DDIM 50, 32³ grid, 2.5D) the output's correlation with the real T1 inside the brain
        was 0.01 after 200 steps, 0.32 after 1,000, 0.55 after 2,000 (about 4.5 min on 2 idle CPU cores) and 0.62 after
        4,000 (the PD source: -0.88)."""
        settings = dict(grid=(32, 32, 32), channels=(16, 32), attention_levels=(False, False), num_res_blocks=1,
                        norm_num_groups=8, steps=2000, batch_size=8, lr=1e-3, ema_decay=0.99)
        settings.update(overrides)
        return cls(**settings)

    def __post_init__(self) -> None:
        if self.mode not in ("2.5d", "3d"):
            raise BadInputError(f"Translation mode must be '2.5d' or '3d'; got {self.mode!r}.")
        if self.voxel_axes not in ("ras", "storage"):
            raise BadInputError(f"voxel_axes must be 'ras' or 'storage'; got {self.voxel_axes!r}.")
        if len(self.grid) != 3 or min(self.grid) < 1:
            raise BadInputError(f"The model grid must be three positive voxel counts (I, J, K); got {tuple(self.grid)}.")
        # the UNet halves each network axis once per level after the first; the skips need exact halves
        multiple = 2 ** (len(self.channels) - 1)
        network_axes = self.grid[:2] if self.mode == "2.5d" else self.grid
        if any(size % multiple for size in network_axes):
            fitted = nearest_multiple_shape(network_axes, multiple) + tuple(self.grid[len(network_axes):])
            raise BadInputError(
                f"The model grid {tuple(self.grid)} does not fit a {len(self.channels)}-level network: "
                f"{'I and J' if self.mode == '2.5d' else 'I, J and K'} must be multiples of {multiple} (e.g. {fitted})."
            )

    @property
    def spatial_dims(self) -> int:
        return 2 if self.mode == "2.5d" else 3


def build_unet(config: TranslationConfig) -> DiffusionModelUNet:
    return DiffusionModelUNet(
        spatial_dims=config.spatial_dims, in_channels=3 if config.conditioned else 1, out_channels=1,
        channels=tuple(config.channels), attention_levels=tuple(config.attention_levels),
        num_res_blocks=config.num_res_blocks, norm_num_groups=config.norm_num_groups, num_head_channels=8,
    )


def build_scheduler(config: TranslationConfig) -> DDPMScheduler:
    """Linear beta 1e-4..0.02, fixed-large variance, no clipping (data stay in [0, 1]; spec A.8)."""
    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, schedule="linear_beta", beta_start=1e-4,
                         beta_end=0.02, variance_type="fixed_large", clip_sample=False)


def _lmi(config: TranslationConfig, source: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    return lmi_map(source, moving, window=config.lmi_window, radius=config.lmi_radius, bins=config.lmi_bins,
                   normalize=config.lmi_normalize, compat=config.lmi_compat, memory_budget_mb=config.memory_budget_mb)[0]


def ras_axes(affine: torch.Tensor | np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """How to lay a volume's voxel axes out as (nearest) left→Right, posterior→Anterior, inferior→Superior.

    Returns:
        ``(order, flips)``: ``order[w]`` is the voxel axis (0..2) that runs along RAS world axis w, ``flips`` the voxel
        axes that run against it. Axes are permuted and flipped only, never resampled, so the map is exact.
    """
    orientation = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    flips = tuple(axis for axis in range(3) if orientation[axis, 1] < 0)
    order = tuple(int(np.flatnonzero(orientation[:, 0] == world)[0]) for world in range(3))
    return order, flips


def _to_ras_axes(data: torch.Tensor, volume) -> torch.Tensor:
    """``data`` ``(C, I, J, K)`` of ``volume`` (a MetaTensor; a plain tensor is taken as it is) on RAS-ordered axes
    (:func:`from_model_grid` inverts it)."""
    if not isinstance(volume, MetaTensor):
        return data
    order, flips = ras_axes(volume.affine)
    return data.flip([1 + axis for axis in flips]).permute(0, *(1 + axis for axis in order))


def to_model_grid(volume: MetaTensor, config: TranslationConfig, name: str) -> torch.Tensor:
    """A volume ``(1, I, J, K)`` scaled to [0, 1] (0.5-99.5 percentiles), laid out on the model's voxel axes and
    resized to the model grid. With ``config.voxel_axes == "ras"`` (default) a MetaTensor's axes are permuted/flipped
    by :func:`ras_axes`, so a scan stored sagittally meets the same model as one stored axially, and 2.5d slices are
    axial (the last axis runs inferior→superior); ``"storage"`` keeps the storage order.

    Returns ``(1, 1, I, J, K)`` (3d) or ``(K, 1, I, J)`` slices (2.5d) on the model's axes.
    """
    data = volume.as_tensor() if isinstance(volume, MetaTensor) else volume
    if data.ndim != 4 or data.shape[0] != 1:
        raise BadInputError(f"{name} must be one 3D volume (1, I, J, K); got shape {tuple(data.shape)}.")
    if not torch.isfinite(data).all():
        raise BadInputError(f"{name} contains NaN or infinite voxels; fix or mask them first.")
    check_not_constant(data, name, "to translate")
    scaled = scale_to_unit(data)
    if config.voxel_axes == "ras":
        scaled = _to_ras_axes(scaled, volume)
    resized = F.interpolate(torch.as_tensor(scaled)[None], size=tuple(config.grid), mode="trilinear", align_corners=False).clamp(0, 1)
    if config.spatial_dims == 3:
        return resized
    return resized[0, 0].permute(2, 0, 1)[:, None]  # (K, 1, I, J)


def from_model_grid(grid_tensor: torch.Tensor, reference: MetaTensor, config: TranslationConfig) -> MetaTensor:
    """Inverse of :func:`to_model_grid`: back to the reference's axes, shape and affine, values in [0, 1]."""
    volume = grid_tensor if config.spatial_dims == 3 else grid_tensor[:, 0].permute(1, 2, 0)[None, None]
    on_ras_axes = config.voxel_axes == "ras" and isinstance(reference, MetaTensor)
    order, flips = ras_axes(reference.affine) if on_ras_axes else ((0, 1, 2), ())
    resized = F.interpolate(volume.float(), size=tuple(reference.shape[1 + axis] for axis in order), mode="trilinear",
                            align_corners=False)[0]
    # back from the model's axes to the reference's: the inverse permutation, then the flips
    restored = resized.permute(0, *(1 + order.index(axis) for axis in range(3))).flip([1 + axis for axis in flips])
    return MetaTensor(restored.clamp(0, 1).contiguous(), affine=reference.affine)


def train_translation(
    volumes: list[MetaTensor],
    out_dir: str | os.PathLike,
    config: TranslationConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    reporter: Reporter | None = None,
    target_modality: str | None = None,
    seed: int = 0,
) -> Path:
    """Train on target-modality volumes only; returns the model folder (resumes a partial run there).

    ``target_modality`` (e.g. ``"T1"``) is recorded in ``medgen_model.json`` so that translations can be named after it.
    ``seed`` seeds the network's initial weights and the training draws (batches, noise, timesteps).
    """
    config = config or TranslationConfig()
    reporter = as_reporter(reporter)
    device = torch.device(device)
    if not volumes:
        raise BadInputError("Training a translation model needs at least one target-modality volume.")
    data = torch.cat([to_model_grid(volume, config, display_name(volume, f"training volume {n}")) for n, volume in enumerate(volumes)])
    if config.spatial_dims == 2:
        data = data[data.flatten(1).amax(1) > EMPTY_SLICE_MAX]
        if not len(data):
            raise BadInputError(
                f"Every axial slice of the {len(volumes)} training volume(s) is empty once scaled to [0, 1] (0.5-99.5 "
                f"percentiles; no voxel above {EMPTY_SLICE_MAX}): the volumes are almost all background. "
                "Train on volumes with visible anatomy."
            )
    # a run continued with other volumes or settings would mix two models in one folder; steps may grow
    check_same_run(out_dir, {**dataclasses.asdict(config), "target_modality": target_modality, "seed": seed},
                   weights_hash({"grid_data": data}), may_change=("steps", "memory_budget_mb"),
                   added_later={"seed": 0, "voxel_axes": "storage"})
    data = data.to(device)
    self_lmi = None
    if config.conditioned:  # M(x0, x0) is fixed per sample: compute it once (spec A.8 caching)
        reporter.progress("self-lmi", 0, 1)
        self_lmi = torch.cat([_lmi(config, chunk, chunk) for chunk in data.split(32)])
        reporter.progress("self-lmi", 1, 1)
    scheduler = build_scheduler(config)
    torch.manual_seed(seed)  # the initial weights from the seed alone
    unet = build_unet(config).to(device)

    def loss_fn(network, batch):
        x0 = data[batch]
        noise = torch.randn_like(x0)
        t = torch.randint(0, config.num_train_timesteps, (x0.shape[0],), device=device)
        x_t = scheduler.add_noise(x0, noise, t)
        network_input = x_t
        if config.conditioned:
            x_next = scheduler.add_noise(x0, noise, (t + 1).clamp(max=config.num_train_timesteps - 1))
            network_input = torch.cat([x_t, _lmi(config, x0, x_next), self_lmi[batch]], dim=1)
        return F.mse_loss(network(network_input, timesteps=t).float(), noise)

    result = train_diffusion(
        unet, loss_fn, list(range(len(data))), torch.optim.Adam(unet.parameters(), lr=config.lr),
        TrainConfig(max_steps=config.steps, batch_size=capped_batch_size(config.batch_size, len(data), reporter), ema_decay=config.ema_decay,
                    checkpoint_every=max(1, config.steps // 4), keep_checkpoints=1, seed=seed),
        checkpoint_dir=Path(out_dir) / "checkpoints", reporter=reporter,
    )
    trained = result.ema_model if result.ema_model is not None else unet
    context = dist_context_from_env()
    if context.is_main:  # under torchrun the ranks hold the same weights: one writes them
        write_safetensors(trained.state_dict(), Path(out_dir) / "unet.safetensors")
        # the steps the weights had: a folder trained further before keeps its longer training
        trained_config = dataclasses.replace(config, steps=result.step)
        write_model_json(out_dir, TASK, config=dataclasses.asdict(trained_config), seed=seed, training_volumes=len(volumes),
                         target_modality=target_modality)
    if context.is_distributed:
        torch.distributed.barrier()  # the folder is complete before any rank returns it
    return Path(out_dir)


def load_translation_model(model_dir: str | os.PathLike, device: torch.device) -> tuple[TranslationConfig, DiffusionModelUNet]:
    document = read_model_json(model_dir, TASK)
    if isinstance(document.get("config"), dict):  # folders written before the setting kept the storage order
        document["config"].setdefault("voxel_axes", "storage")
    config = model_config(model_dir, document, TranslationConfig, "translation-model")
    return config, load_weights_into(build_unet(config), Path(model_dir) / "unet.safetensors").to(device).eval()


def translate_volume(
    source: MetaTensor,
    model_dir: str | os.PathLike,
    *,
    sampler: str = "ddpm",
    steps: int = 1000,
    sdedit_start: int | None = None,
    eta: float = 1.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    reporter: Reporter | None = None,
    memory_budget_mb: float | None = None,
) -> MetaTensor:
    """Translate ``source`` ``(1, I, J, K)`` into the model's modality; the output keeps the source's geometry.

    Args:
        sampler: ``ddpm`` (all T steps, as released) or ``ddim`` (``steps`` strided steps).
        steps: DDIM steps (ignored by ``ddpm``).
        sdedit_start: SDEdit baseline: noise the source to this timestep and denoise (needs an unconditional model).
        eta: DDIM stochasticity in [0, 1] (ignored by ``ddpm``). The default 1 adds fresh noise every step like
            DDPM. Deterministic DDIM (0) drifts with small or briefly trained models: on the phantoms of
            ``bench/bench_translation_phantom.py`` half the voxels ended saturated at 0 or 1 (class Dice
            0.59/0.42/0.35 at 25 steps) while eta=1 gave 3 % saturated and Dice 0.94/0.91/0.85.
        seed: noise seed.
        memory_budget_mb: LMI chunk budget for this run (None: the model's); lower it when the GPU runs out of memory.
    """
    device = torch.device(device)
    if not 0.0 <= eta <= 1.0:
        raise BadInputError(f"eta must lie in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like); got {eta}.")
    config, unet = load_translation_model(model_dir, device)
    if memory_budget_mb is not None:
        config = dataclasses.replace(config, memory_budget_mb=float(memory_budget_mb))
    source_grid = to_model_grid(source, config, "source volume").to(device)
    T = config.num_train_timesteps
    if sampler == "ddpm":
        scheduler, timesteps = build_scheduler(config), list(range(T - 1, -1, -1))
    elif sampler == "ddim":
        check_ddim_steps(steps, T)
        stride = T // steps
        scheduler = DDIMScheduler(num_train_timesteps=T, schedule="linear_beta", beta_start=1e-4, beta_end=0.02,
                                  clip_sample=False, set_alpha_to_one=True, steps_offset=stride - 1)
        timesteps = strided_timesteps(T, steps, offset=stride - 1)
    else:
        raise BadInputError(f"Unknown sampler {sampler!r}: use 'ddpm' or 'ddim'.")
    generator = torch.Generator(device=device).manual_seed(seed)
    if sdedit_start is not None:
        if config.conditioned:
            raise BadInputError("SDEdit needs an unconditional model (trained with conditioned=False).")
        denoise = lambda x_t, t: unet(x_t, timesteps=t)  # noqa: E731
        output = sdedit(denoise, scheduler, source_grid, sdedit_start, timesteps=timesteps, generator=generator, eta=eta,
                        reporter=reporter, phase="sdedit")
        return from_model_grid(output.clamp(0, 1).cpu(), source, config)
    if not config.conditioned:
        raise BadInputError("This model is unconditional (an SDEdit baseline); pass sdedit_start (--sdedit-start on the command line) or pick an LMI model.")
    self_lmi = _lmi(config, source_grid, source_grid)

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        condition = torch.cat([_lmi(config, source_grid, x_t), self_lmi], dim=1)  # recomputed every step (A.5)
        return unet(torch.cat([x_t, condition], dim=1), timesteps=t)

    noise = torch.randn(source_grid.shape, generator=generator, device=device)
    output = sample(denoise, scheduler, noise, timesteps=timesteps, generator=generator, eta=eta, reporter=reporter, phase="translating")
    return from_model_grid(output.clamp(0, 1).cpu(), source, config)


def lmi_agreement(config: TranslationConfig, source: MetaTensor, translated: MetaTensor) -> float:
    """Mean LMI between a source and a translation on the model grid (higher = structure kept)."""
    return float(_lmi(config, to_model_grid(source, config, "source"), to_model_grid(translated, config, "translation")).mean())


__all__ = ["TASK", "TranslationConfig", "lmi_agreement", "train_translation", "translate_volume"]
