"""LinkNet3d, the brain-extraction network of deepbet, as a plain (eager) PyTorch module.

deepbet 1.0.2 ships the network only as TorchScript, which adapters (peft LoRA, TenVOO) and
``torch.func`` cannot wrap. This module rebuilds it layer for layer from the archive's graph
(``torch.jit.load(...).code`` and ``named_modules``): module names, so state-dict keys, are the
archive's own, and every convolution's stride, padding and output padding are the ones the graph
calls. Written by hand because no library provides this network.
"""

from __future__ import annotations

import torch
from torch import nn


def _norm_relu(channels: int) -> list[nn.Module]:
    # deepbet's InstanceNorm3d has no affine parameters and no running statistics
    return [nn.InstanceNorm3d(channels), nn.ReLU()]


class Block(nn.Module):
    """Residual block: ``relu(IN(conv(relu(IN(conv(x))))) + shortcut(x))``; the first conv may stride 2."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            *_norm_relu(out_channels),
            nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.InstanceNorm3d(out_channels),
        )
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False), nn.InstanceNorm3d(out_channels)
            )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act(self.double_conv(x) + shortcut)


class Down(nn.Module):
    """Encoder stage: two residual blocks, the first one changing width and (stride 2) halving the size."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.block1 = Block(in_channels, out_channels, stride)
        self.block2 = Block(out_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(x))


class Up(nn.Module):
    """LinkNet decoder stage: 1³ conv to in/4 channels, 3³ transposed conv (stride 1 or 2), 1³ conv to out."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        bottleneck = in_channels // 4
        self.conv1 = nn.Sequential(nn.Conv3d(in_channels, bottleneck, 1, bias=False), *_norm_relu(bottleneck))
        self.tp_conv = nn.Sequential(
            nn.ConvTranspose3d(
                bottleneck, bottleneck, 3, stride=stride, padding=1, output_padding=stride - 1, bias=False
            ),
            *_norm_relu(bottleneck),
        )
        self.conv2 = nn.Sequential(nn.Conv3d(bottleneck, out_channels, 1, bias=False), *_norm_relu(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.tp_conv(self.conv1(x)))


class LinkNet3d(nn.Module):
    """3D LinkNet (deepbet's brain-extraction network): 2,126,258 parameters with the defaults.

    Args:
        in_channels: input channels (deepbet: 1, a T1w volume normalised by ``deepbet_preprocess``).
        out_channels: output classes (deepbet: 2, channel 1 = brain).
        widths: encoder widths of the four stages.
        softmax: apply a softmax over channels (deepbet's released network does); False gives logits,
            which a training loss wants.

    Input ``(B, in_channels, D, H, W)`` with D, H, W multiples of 32 and at least 64 (the deepest
    stage is 1/32 of the input and instance norm needs more than one voxel there); output
    ``(B, out_channels, D, H, W)``, probabilities in [0, 1] when ``softmax``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        widths: tuple[int, ...] = (16, 32, 64, 128),
        softmax: bool = True,
    ) -> None:
        super().__init__()
        first = widths[0]
        self.softmax = softmax
        self.init = nn.Sequential(
            nn.Conv3d(in_channels, first, 7, stride=2, padding=3, bias=False),
            *_norm_relu(first),
            nn.MaxPool3d(3, stride=2, padding=1),
        )
        stage_inputs = (first, *widths[:-1])
        for index, (stage_in, stage_out) in enumerate(zip(stage_inputs, widths)):
            self.add_module(f"down{index}", Down(stage_in, stage_out, stride=1 if index == 0 else 2))
        # decoder stages mirror the encoder: up0 undoes the deepest stage, the last one keeps the size
        for index, (stage_in, stage_out) in enumerate(zip(reversed(widths), reversed(stage_inputs))):
            last = index == len(widths) - 1
            self.add_module(f"up{index}", Up(stage_in, stage_out, stride=1 if last else 2))
        half = first // 2
        self.tp_conv1 = nn.Sequential(
            nn.ConvTranspose3d(first, half, 3, stride=2, padding=1, output_padding=1), *_norm_relu(half)
        )
        self.conv = nn.Sequential(nn.Conv3d(half, half, 3, padding=1), *_norm_relu(half))
        self.tp_conv2 = nn.ConvTranspose3d(half, out_channels, 2, stride=2)
        self.num_stages = len(widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.init(x)]
        for index in range(self.num_stages):
            skips.append(getattr(self, f"down{index}")(skips[-1]))
        decoded = skips.pop()
        for index in range(self.num_stages):
            decoded = getattr(self, f"up{index}")(decoded) + skips.pop()
        output = self.tp_conv2(self.conv(self.tp_conv1(decoded)))
        return torch.softmax(output, dim=1) if self.softmax else output
