"""FSEFT's black-box spatial adapter: a residual two-conv block on the features entering the head.

Hand-written (no library has it); spec fseft.md §4.1 ``bb3DAdapter``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medgen.errors import BadInputError
from medgen.peft.config import MethodConfig


@dataclass
class SpatialAdapterConfig(MethodConfig):
    """Options of ``spatial-adapter``; ``head`` (the output Conv3d) is required.

    Args:
        kernel_size: odd kernel size of both convolutions (FSEFT: 3; 1 gives its ``bbAdapter``).
    """

    kernel_size: int = 3

    POSITIVE = (*MethodConfig.POSITIVE, "kernel_size")


class SpatialAdapter(nn.Module):
    """x + conv2(ReLU(conv1(x))), bias-free convs with "same" padding; conv2 starts at zero (identity at start).

    Args:
        channels: feature channels C of the input (B, C, D, H, W); output has the same shape.
        kernel_size: odd kernel size.
    """

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise BadInputError(f"spatial-adapter kernel_size must be odd to keep the shape, got {kernel_size}.")
        padding = kernel_size // 2
        self.adapter = nn.Sequential(
            nn.Conv3d(channels, channels, kernel_size, padding=padding, bias=False),
            nn.ReLU(),
            nn.Conv3d(channels, channels, kernel_size, padding=padding, bias=False),
        )
        nn.init.zeros_(self.adapter[2].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, C, D, H, W) features. Returns: adapted features, same shape."""
        return x + self.adapter(x)


def apply_spatial_adapter(model: nn.Module, config: SpatialAdapterConfig) -> list[str]:
    """Put a :class:`SpatialAdapter` in front of the head, in place; returns the adapter's module name."""
    if config.head is None:
        raise BadInputError("spatial-adapter needs head=<name of the output Conv3d>, e.g. head='out.conv.conv'.")
    head = model.get_submodule(config.head)
    if not isinstance(head, nn.Conv3d):
        raise BadInputError(
            f"spatial-adapter needs the head to be a Conv3d; {config.head!r} is a {type(head).__name__}."
        )
    adapter = SpatialAdapter(head.in_channels, config.kernel_size).to(head.weight.device, head.weight.dtype)
    model.set_submodule(config.head, nn.Sequential(adapter, head))
    return [f"{config.head}.0"]
