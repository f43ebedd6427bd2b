"""Noise schedules that MONAI does not ship, registered in MONAI's own ``NoiseSchedules`` store.

Importing this module (``import medgen.diffusion`` does it) makes the schedules usable by name in
MONAI's schedulers, e.g. ``DDIMScheduler(schedule=SIGMOID_SCHEDULE)``.
"""

from __future__ import annotations

import torch
from monai.networks.schedulers import NoiseSchedules

#: name of the DIFF-3 / lucidrains sigmoid schedule in MONAI's ``NoiseSchedules``
SIGMOID_SCHEDULE = "sigmoid_alphas_cumprod"

# The released code clips every beta to 0.999 so that the last step (where the continuous
# alpha-bar reaches exactly 0) stays invertible.
_MAX_BETA = 0.999


def _sigmoid_betas(num_steps: int, start: float, end: float, tau: float) -> torch.Tensor:
    """Betas of the alpha-bar sigmoid schedule, in float64 (spec C.5)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    if end <= start or tau <= 0:
        raise ValueError(f"Need start < end and tau > 0, got start={start}, end={end}, tau={tau}.")
    # continuous time s = t/T on the T+1 grid points 0, 1/T, ..., 1
    s = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
    sig_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    sig_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    alpha_bar_continuous = (sig_end - torch.sigmoid((s * (end - start) + start) / tau)) / (sig_end - sig_start)
    alpha_bar_continuous = alpha_bar_continuous / alpha_bar_continuous[0]
    betas = 1.0 - alpha_bar_continuous[1:] / alpha_bar_continuous[:-1]
    return betas.clamp(0.0, _MAX_BETA)


def sigmoid_alphas_cumprod(
    num_steps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0
) -> torch.Tensor:
    """The alpha-bar table of the sigmoid schedule used by DIFF-3 (lucidrains' ``sigmoid`` schedule).

    The continuous alpha-bar is ``a(s) ∝ sigmoid(end/tau) - sigmoid((s*(end-start)+start)/tau)`` for
    ``s = t/T in [0, 1]``, normalised so ``a(0) = 1``; ``beta_t = clip(1 - a((t+1)/T)/a(t/T), 0, 0.999)``
    and the returned table is ``cumprod(1 - beta)``. This is not MONAI's ``sigmoid_beta`` (a sigmoid
    over beta).

    Args:
        num_steps: number of diffusion steps T (DIFF-3: 1000).
        start, end: sigmoid input range (DIFF-3: -3 and 3).
        tau: temperature of the sigmoid (DIFF-3: 1).

    Returns:
        float32 tensor of shape ``(T,)``, values in (0, 1], decreasing; for T=1000 entry 0 is 0.99970,
        entry 499 is 0.5 and entry 999 is about 3.0e-7.
    """
    alphas = 1.0 - _sigmoid_betas(num_steps, start, end, tau)
    return torch.cumprod(alphas, dim=0).to(torch.float32)


@NoiseSchedules.add_def(SIGMOID_SCHEDULE, "Sigmoid over alpha-bar (lucidrains / DIFF-3), betas clipped to 0.999")
def _sigmoid_schedule(
    num_train_timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(betas, alphas, alphas_cumprod), float32, each of shape ``(num_train_timesteps,)``; see
    :func:`sigmoid_alphas_cumprod` for the formula and arguments."""
    betas = _sigmoid_betas(num_train_timesteps, start, end, tau)
    alphas = 1.0 - betas
    return betas.to(torch.float32), alphas.to(torch.float32), torch.cumprod(alphas, dim=0).to(torch.float32)
