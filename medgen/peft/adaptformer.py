"""AdaptFormer on Swin transformer blocks (MONAI ``SwinTransformerBlock``), as used by FSEFT.

Hand-written (peft has no AdaptFormer): a parallel bottleneck on each block's MLP branch,
x' = x + MLP(LN2(x)) + scale · Up(ReLU(Down(x))), with x the residual stream after attention (spec fseft.md §4.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medgen.peft.config import MethodConfig, match_modules, select_types


@dataclass
class AdaptFormerConfig(MethodConfig):
    """Options of ``adaptformer``; ``target_modules`` should name the Swin blocks.

    Args:
        bottleneck: hidden width of the adapter (FSEFT: 16).
        scale: factor on the adapter branch (FSEFT: 0.1).
    """

    bottleneck: int = 16
    scale: float = 0.1

    POSITIVE = (*MethodConfig.POSITIVE, "bottleneck")


class AdaptFormerBlock(nn.Module):
    """A frozen Swin block with a parallel bottleneck on its MLP branch; up-projection zero ⇒ identity at start.

    Args:
        block: MONAI ``SwinTransformerBlock`` of width ``block.dim``.
        bottleneck: hidden width of the adapter.
        scale: factor on the adapter output.
    """

    def __init__(self, block: nn.Module, bottleneck: int = 16, scale: float = 0.1) -> None:
        super().__init__()
        self.block = block
        self.scale = scale
        self.down = nn.Linear(block.dim, bottleneck)
        self.up = nn.Linear(bottleneck, block.dim)
        block_weight = next(block.parameters())
        self.to(block_weight.device, block_weight.dtype)  # the branch lives where the block does (the block stays)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, mask_matrix: torch.Tensor | None) -> torch.Tensor:
        """Args: x: (B, D, H, W, C) tokens; mask_matrix: shifted-window attention mask. Returns: same shape as x."""
        x = x + self.block.drop_path(self.block.forward_part1(x, mask_matrix))
        adapter = self.up(torch.relu(self.down(x)))
        return x + self.block.forward_part2(x) + self.scale * adapter


def apply_adaptformer(model: nn.Module, config: AdaptFormerConfig) -> list[str]:
    """Wrap every matched ``SwinTransformerBlock`` in place; returns their names."""
    # MONAI's network package is slow to import: only load it when this method is used
    from monai.networks.nets.swin_unetr import SwinTransformerBlock

    matches = match_modules(model, config.target_modules)
    blocks = select_types(matches, (SwinTransformerBlock,), "adaptformer", explicit_targets=False)
    for name, block in blocks:
        model.set_submodule(name, AdaptFormerBlock(block, config.bottleneck, config.scale))
    return [name for name, _ in blocks]
