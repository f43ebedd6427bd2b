"""One reverse-diffusion loop for every model family, driven by a MONAI DDPM or DDIM scheduler.

The network enters only through ``denoise(x_t, t) -> prediction`` (see :mod:`medgen.diffusion.denoisers`),
so a plain UNet, a conditioned UNet, ControlNet + UNet, a classifier-free-guidance pair or a denoiser
that recomputes its condition from ``x_t`` every step (LMI translation) all use the same loop.
The loops run under ``torch.no_grad()``; a denoiser that needs gradients (guidance on x0) wraps its
body in ``torch.enable_grad()``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from medgen.errors import BadInputError, ModelError, OutOfMemoryError, is_out_of_memory
from medgen.progress import Reporter, as_reporter

#: ``denoise(x_t, t)``: x_t ``(B, C, D, H, W)`` in the model's dtype, t ``(B,)`` int64 -> prediction
#: of the scheduler's ``prediction_type`` (epsilon, sample or v), same shape as x_t.
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``post_step(x_prev, x0_pred, t) -> x_prev``: runs after every scheduler step (clamping, inpainting, ...).
PostStep = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def _checked_timesteps(scheduler: DDPMScheduler | DDIMScheduler, timesteps: Sequence[int] | None) -> list[int]:
    """The timesteps to run, checked against what MONAI's ``step`` assumes about the previous timestep.

    MONAI's DDPM step always moves t -> t-1 and its DDIM step moves t -> t - T // num_inference_steps,
    whatever list the loop iterates, so a list that disagrees would silently mix noise levels.
    For DDIM, an explicit list sets ``scheduler.num_inference_steps`` and ``scheduler.timesteps``; an explicit
    single timestep t (one DDIM step, or SDEdit from the last strided timestep) is the last step, so its stride is
    set beyond t and the step lands on the x0 estimate instead of at t-1 (a fresh scheduler's stride is 1).
    """
    num_train = scheduler.num_train_timesteps
    chosen = [int(t) for t in (scheduler.timesteps if timesteps is None else timesteps)]
    if not chosen:
        raise BadInputError("The timestep list is empty: give at least one timestep.")
    if any(not 0 <= t < num_train for t in chosen):
        raise BadInputError(f"Timesteps must lie in [0, {num_train - 1}]; got {chosen[0]} ... {chosen[-1]}.")
    gaps = {a - b for a, b in zip(chosen, chosen[1:])}
    if isinstance(scheduler, DDIMScheduler):
        uneven = len(gaps) > 1 or min(gaps, default=1) <= 0
        if timesteps is None:
            num_steps = scheduler.num_inference_steps
            stride = next(iter(gaps)) if gaps else num_train // num_steps
        elif gaps:
            stride = next(iter(gaps))
            num_steps = num_train // max(stride, 1)
        else:
            num_steps = num_train // (chosen[0] + 1)
            stride = num_train // num_steps  # > t: MONAI's step goes past 0, to the final alpha (1 with set_alpha_to_one)
        if uneven or num_train // num_steps != stride:
            raise BadInputError(
                f"DDIM timesteps must decrease by one constant stride equal to T // num_inference_steps "
                f"(MONAI steps t -> t - {num_train} // {num_steps}); got {chosen[:4]} ... {chosen[-2:]}. "
                "Pass timesteps=strided_timesteps(T, num_steps, offset) instead."
            )
        if timesteps is not None:
            scheduler.num_inference_steps = num_steps
            scheduler.timesteps = torch.tensor(chosen, dtype=torch.long)
    elif isinstance(scheduler, DDPMScheduler):
        if gaps - {1}:
            raise BadInputError(
                "DDPM timesteps must be consecutive (t, t-1, ..., because MONAI's DDPM step always goes to t-1); "
                f"got {chosen[:4]} ... {chosen[-2:]}. Use a DDIMScheduler for strided sampling."
            )
    else:
        raise BadInputError(f"Expected a MONAI DDPMScheduler or DDIMScheduler, got {type(scheduler).__name__}.")
    return chosen


def strided_timesteps(num_train_timesteps: int, num_steps: int, offset: int = 0) -> list[int]:
    """Evenly spaced decreasing timesteps ``offset + s*(num_steps-1), ..., offset + s, offset`` with
    ``s = num_train_timesteps // num_steps``.

    DIFF-3's DDIM: ``strided_timesteps(1000, 100, 9)`` = 999, 989, ..., 9. MRGen's diffusers "leading"
    spacing: ``strided_timesteps(1000, 50, 1)`` = 981, 961, ..., 1. MONAI's own ``set_timesteps`` rounds a
    linspace, which is uneven for many step counts.
    """
    stride = num_train_timesteps // max(num_steps, 1)
    if num_steps < 1 or stride < 1 or not 0 <= offset < stride:
        raise BadInputError(
            f"Need 1 <= num_steps <= {num_train_timesteps} and 0 <= offset < {num_train_timesteps} // num_steps; "
            f"got num_steps={num_steps}, offset={offset}."
        )
    return [offset + stride * k for k in range(num_steps - 1, -1, -1)]


def check_ddim_steps(steps: int, num_train_timesteps: int) -> None:
    """:class:`BadInputError` unless ``steps`` divides T, for samplers that start at t = T-1 from pure noise: MONAI's
    DDIM moves by one constant stride T // steps, so another count would start the chain lower (MIDiffusion's quirk
    Q5; 300 of 1000 steps start at t = 899) or end it short of t = 0."""
    if not 1 <= steps <= num_train_timesteps or num_train_timesteps % steps:
        divisors = [count for count in range(1, num_train_timesteps + 1) if num_train_timesteps % count == 0]
        nearest = sorted(sorted(divisors, key=lambda count: abs(count - steps))[:2])
        raise BadInputError(
            f"DDIM steps must divide the model's {num_train_timesteps} training timesteps, so that the chain starts at "
            f"t = {num_train_timesteps - 1} and ends at t = 0 with one stride; got {steps}, use e.g. "
            f"{' or '.join(map(str, nearest))}."
        )


def _use_fp32_schedule(scheduler: DDPMScheduler | DDIMScheduler) -> None:
    """Keep the schedule tables in float32: MONAI's ``add_noise`` casts ``alphas_cumprod`` to the dtype of its input,
    so one bf16 call would otherwise make every later step run its arithmetic in bf16. Casting it back would keep the
    bf16 rounding (ᾱ_t of exactly 1 near t = 0, where the DDPM step then divides 0 by 0), so a cast ᾱ is rebuilt
    from the float32 alphas, as MONAI built it."""
    for name in ("betas", "alphas"):
        setattr(scheduler, name, getattr(scheduler, name).to(torch.float32))
    if scheduler.alphas_cumprod.dtype != torch.float32:
        scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0).to(scheduler.alphas_cumprod.device)


@torch.no_grad()
def sample(
    denoise: Denoiser,
    scheduler: DDPMScheduler | DDIMScheduler,
    noise: torch.Tensor,
    *,
    timesteps: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    model_dtype: torch.dtype | None = None,
    post_step: PostStep | None = None,
    reporter: Reporter | None = None,
    phase: str = "sampling",
) -> torch.Tensor:
    """Run the reverse process from ``noise`` down through ``timesteps``.

    Args:
        denoise: ``denoise(x_t, t) -> prediction``; x_t ``(B, C, D, H, W)``, t ``(B,)`` int64.
        scheduler: a configured MONAI ``DDPMScheduler`` or ``DDIMScheduler`` (schedule, prediction type,
            ``clip_sample``, ``set_alpha_to_one``, ``steps_offset`` and ``set_timesteps`` as the model needs).
        noise: the starting sample x_T ``(B, C, D, H, W)``, usually N(0, I) drawn with ``generator``;
            any float dtype and device (the loop keeps it in float32 on that device).
        timesteps: explicit decreasing timesteps, e.g. ``range(999, -1, -10)`` for DIFF-3's DDIM;
            None runs ``scheduler.timesteps``. Checked against MONAI's step rule (see ``BadInputError``).
        generator: random generator on ``noise.device`` for the DDPM / DDIM(eta > 0) step noise.
        eta: DDIM stochasticity, 0 = deterministic; ignored by DDPM.
        model_dtype: dtype ``x_t`` is cast to before ``denoise`` (e.g. ``torch.bfloat16`` inside a bfloat16
            ``torch.autocast``, which the float32 weights need); the prediction is cast back and the scheduler
            arithmetic stays float32. None = float32.
        post_step: optional ``post_step(x_prev, x0_pred, t) -> x_prev`` run after each step.
        reporter: gets ``progress(phase, i, n)`` after each step; ``check_cancelled()`` runs before each.
        phase: phase name used in the progress events.

    Returns:
        float32 tensor shaped like ``noise``: the sample after the last timestep (with DDIM,
        ``set_alpha_to_one=True`` and a last timestep below the stride, this is the model's x0 estimate).

    Raises:
        BadInputError: timesteps that do not fit the scheduler, or an unsupported scheduler.
        OutOfMemoryError: the model ran out of memory (the message suggests smaller settings).
        CancelledError: when the reporter reports a cancel between steps.
    """
    reporter = as_reporter(reporter)
    chosen = _checked_timesteps(scheduler, timesteps)
    _use_fp32_schedule(scheduler)
    x = noise.to(torch.float32)
    batch_size = x.shape[0]
    for index, t in enumerate(chosen):
        reporter.check_cancelled()
        t_batch = torch.full((batch_size,), t, dtype=torch.long, device=x.device)
        try:
            prediction = denoise(x.to(model_dtype or torch.float32), t_batch).to(torch.float32)
        except (RuntimeError, MemoryError) as error:
            if not is_out_of_memory(error) or isinstance(error, OutOfMemoryError):  # MedGen's own (LMI) says more
                raise
            raise OutOfMemoryError(
                f"Out of {x.device.type.upper()} memory while sampling a batch of {batch_size} "
                f"{tuple(x.shape[2:])} volume(s): sample fewer volumes per batch or a smaller size, or sample under "
                "bfloat16 autocast (from Python: with torch.autocast('cuda', dtype=torch.bfloat16), model_dtype=torch.bfloat16)."
            ) from error
        if not bool(torch.isfinite(prediction).all()):  # else NaN volumes would be written as results
            raise ModelError(
                f"The model predicted NaN or infinite values at timestep {t}: its weights are damaged or its training "
                "diverged. Retrain it, or restore its folder from a copy."
            )
        if isinstance(scheduler, DDIMScheduler):
            x, x0_pred = scheduler.step(prediction, t, x, eta=eta, generator=generator)
        else:
            x, x0_pred = scheduler.step(prediction, t, x, generator=generator)
            if t == 0:  # exactly x0_pred (coefficient β0 / (1 - ᾱ0) = 1, no noise); float32 tables make it 0.99983
                x = x0_pred
        if post_step is not None:
            x = post_step(x, x0_pred, t)
        reporter.progress(phase, index + 1, len(chosen))
    return x


@torch.no_grad()
def sdedit(
    denoise: Denoiser,
    scheduler: DDPMScheduler | DDIMScheduler,
    x0: torch.Tensor,
    start_timestep: int,
    *,
    timesteps: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    **sample_kwargs,
) -> torch.Tensor:
    """SDEdit: noise a given sample to ``start_timestep`` and denoise it from there.

    ``x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps`` with eps drawn from ``generator``, then
    :func:`sample` over the timesteps that are ``<= start_timestep``. MIDiffusion's SDEdit
    baseline with ``--t N`` is ``start_timestep = N - 1`` on a 1000-step DDPM.

    Args:
        denoise, scheduler: as for :func:`sample`.
        x0: the sample to edit ``(B, C, D, H, W)``, in the model's data range (e.g. [0, 1] or [-1, 1]).
        start_timestep: the noise level to start from; must be one of the timesteps.
        timesteps: the full decreasing timestep list to cut (as for :func:`sample`); None uses
            ``scheduler.timesteps``.
        generator: random generator on ``x0.device`` (noising and step noise).
        sample_kwargs: ``eta``, ``model_dtype``, ``post_step``, ``reporter``, ``phase`` as for :func:`sample`.

    Returns:
        float32 tensor shaped like ``x0``.
    """
    scheduled = [int(t) for t in (scheduler.timesteps if timesteps is None else timesteps)]
    if start_timestep not in scheduled:
        nearest = min(scheduled, key=lambda t: abs(t - start_timestep))
        raise BadInputError(
            f"start_timestep {start_timestep} is not one of the timesteps "
            f"({scheduled[0]}, {scheduled[1] if len(scheduled) > 1 else ''} ...); the nearest is {nearest}."
        )
    _use_fp32_schedule(scheduler)
    x0 = x0.to(torch.float32)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
    t_batch = torch.full((x0.shape[0],), start_timestep, dtype=torch.long, device=x0.device)
    x_t = scheduler.add_noise(x0, eps, t_batch)
    remaining = [t for t in scheduled if t <= start_timestep]
    scheduler_timesteps, scheduler_steps = scheduler.timesteps, scheduler.num_inference_steps
    try:
        return sample(denoise, scheduler, x_t, timesteps=remaining, generator=generator, **sample_kwargs)
    finally:  # the cut list is this call's: the caller's scheduler keeps its full schedule
        scheduler.timesteps, scheduler.num_inference_steps = scheduler_timesteps, scheduler_steps
