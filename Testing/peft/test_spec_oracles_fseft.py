"""Spec fseft.md §9 oracles beyond the main test files of each part:

- O2: the counts the existing test leaves out: bbAdapter (kernel 1) 4,657, BitFit-clean 13,009, FLARE C=10
  LP 490 and bb3DAdapter 124,906, backbone total 62,188,031 with a 29-class head;
- O5: after the first AdamW step the spatial adapter's first conv is unchanged (its gradient is exactly 0 while
  the last conv is 0) and the last conv and the head change (the existing test covers LoRA only);
- O6: the fseft LoRA is peft LoRA r=12 with scale alpha/r = 1: 16 LoRA tensors with 69,120 parameters, and each
  adapted qkv computes W x + b + B(A x) exactly (the existing test checks only the total count and identity at init,
  which an alpha of 24 would pass as well).
"""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.nets import SwinUNETR

from medgen.peft import inject, trainable_parameters


@pytest.fixture(scope="module")
def swin_fs48():
    torch.manual_seed(0)
    return SwinUNETR(in_channels=1, out_channels=1, feature_size=48)


def test_o2_backbone_total_with_29_class_head():
    torch.manual_seed(0)
    model = SwinUNETR(in_channels=1, out_channels=29, feature_size=48)
    assert sum(parameter.numel() for parameter in model.parameters()) == 62_188_031


@pytest.mark.parametrize("method, options, expected", [
    ("spatial-adapter", {"kernel_size": 1}, 4_657),  # bbAdapter
    ("bitfit", {"include_relpos_bias": False}, 13_009),  # BitFit-clean
    ("linear-probe", {"head_out_channels": 10}, 490),  # FLARE C = 10
    ("spatial-adapter", {"head_out_channels": 10}, 124_906),
])
def test_o2_remaining_counts(swin_fs48, method, options, expected):
    model = inject(copy.deepcopy(swin_fs48), method, preset="fseft", **options)
    assert trainable_parameters(model) == expected


def _tiny_swin():
    torch.manual_seed(0)
    norm = ("instance", {"track_running_stats": True})
    return SwinUNETR(in_channels=1, out_channels=1, feature_size=12, depths=(1, 1, 1, 1), norm_name=norm).eval()


INPUT = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))


def test_o5_spatial_adapter_zero_init_dynamics():
    model = inject(_tiny_swin(), "spatial-adapter", preset="fseft")
    adapter = model.get_submodule("out.conv.conv.0").adapter
    head = model.get_submodule("out.conv.conv.1")
    first, last, head_weight = adapter[0].weight.clone(), adapter[2].weight.clone(), head.weight.clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    model(INPUT).pow(2).mean().backward()
    assert adapter[0].weight.grad is not None and not adapter[0].weight.grad.any()  # exactly 0: last conv is 0
    optimizer.step()
    assert torch.equal(adapter[0].weight, first)
    assert not torch.equal(adapter[2].weight, last) and not torch.equal(head.weight, head_weight)


def test_o6_lora_is_peft_r12_scale_one(swin_fs48):
    model = inject(copy.deepcopy(swin_fs48), "lora", preset="fseft")
    lora = {name: p for name, p in model.named_parameters() if p.requires_grad and "lora_" in name}
    assert len(lora) == 16 and sum(p.numel() for p in lora.values()) == 69_120
    small = inject(_tiny_swin(), "lora", preset="fseft")
    layers = [module for name, module in small.named_modules() if name.endswith("attn.qkv")]
    assert len(layers) == 4
    with torch.no_grad():
        for layer in layers:
            a, b = layer.lora_A["default"], layer.lora_B["default"]
            assert a.weight.shape[0] == 12 and b.weight.shape[1] == 12
            b.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(5))
            x = torch.randn(5, layer.base_layer.in_features, generator=torch.Generator().manual_seed(4))
            assert torch.allclose(layer(x), layer.base_layer(x) + b(a(x)), atol=1e-6)
