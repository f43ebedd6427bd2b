"""Latent export and normalisation of DIFF-3 (spec C.4).

Every training case is encoded once; its posterior mean and std are kept. The global bounds
g_min = min(mu - 3 sigma), g_max = max(mu + 3 sigma) over the training set map latents to [0, 1]
(then to [-1, 1] for the diffusion model). Each time a case is drawn a fresh z = mu + sigma * eps is
sampled ("dynamic sampling"), so the diffusion model sees the posterior, not one point.
"""

from __future__ import annotations

import dataclasses

import torch

from medgen.errors import BadInputError


@dataclasses.dataclass
class LatentSet:
    """Posteriors of the training cases and their global bounds.

    Attributes:
        mu, sigma: ``(N, C, d, h, w)`` posterior means and standard deviations.
        g_min, g_max: scalar bounds (floats).
    """

    mu: torch.Tensor
    sigma: torch.Tensor
    g_min: float
    g_max: float

    @classmethod
    def from_posteriors(cls, mu: torch.Tensor, sigma: torch.Tensor) -> "LatentSet":
        if mu.shape != sigma.shape or mu.ndim != 5:
            raise BadInputError(f"Expected matching (N, C, d, h, w) posteriors; got {tuple(mu.shape)} and {tuple(sigma.shape)}.")
        g_min, g_max = float((mu - 3 * sigma).min()), float((mu + 3 * sigma).max())
        if not g_max > g_min:
            raise BadInputError("All latents are identical; the VAE has collapsed. Train it longer or check the data.")
        return cls(mu.detach().float().cpu(), sigma.detach().float().cpu(), g_min, g_max)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Latent -> [-1, 1] (values outside the bounds are clipped)."""
        return ((z - self.g_min) / (self.g_max - self.g_min)).clamp(0.0, 1.0) * 2.0 - 1.0

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> latent."""
        return (x.clamp(-1.0, 1.0) + 1.0) / 2.0 * (self.g_max - self.g_min) + self.g_min

    def draw(self, indices: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Fresh normalised samples ``(len(indices), C, d, h, w)`` on the CPU of the given cases (dynamic sampling);
        ``indices`` may lie on any device."""
        mu, sigma = self.mu[indices.cpu()], self.sigma[indices.cpu()]
        noise = torch.randn(mu.shape, generator=generator)
        return self.normalize(mu + sigma * noise)

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to store with the model (safetensors)."""
        return {"mu": self.mu, "sigma": self.sigma, "bounds": torch.tensor([self.g_min, self.g_max], dtype=torch.float64)}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "LatentSet":
        return cls(state["mu"], state["sigma"], float(state["bounds"][0]), float(state["bounds"][1]))


@torch.no_grad()
def encode_posteriors(vae, inputs: torch.Tensor, batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``(N, 2, I, J, K)`` joint inputs to posterior ``(mu, sigma)`` (MONAI returns sigma, not logvar)."""
    mus, sigmas = [], []
    for start in range(0, inputs.shape[0], batch_size):
        mu, sigma = vae.encode(inputs[start : start + batch_size])
        mus.append(mu)
        sigmas.append(sigma)
    return torch.cat(mus), torch.cat(sigmas)
