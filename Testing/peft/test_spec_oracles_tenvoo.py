"""Spec tenvoo.md §9 oracles beyond test_peft_tenvoo.py:

- O1 / O4 / O6 with a non-cubic kernel (kD, kH, kW) = (3, 5, 1): each kernel axis has its own core, and
  TenVOO-Q's count depends on kH alone (every existing test uses k = 3 on all axes);
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medgen.peft import TenVOOConv3d

SPEC_L = "QPab,Rbcd,Ddef,Hfgh,Whij,Zjkl,YlmX,cane,iomk,gno->PQRDHWXYZ"
SPEC_Q = "QPab,Rbcd,Ddef,HFgh,Wgij,Zjkl,YlmX,kmno,acpn,eiop->PQRDHWXYZ"


KERNEL = (3, 5, 1)  # kD, kH, kW


@pytest.mark.parametrize("mode", ["l", "q"])
def test_o1_o4_o6_non_cubic_kernel(mode):
    f, g, r = (8, 4, 2), (8, 8, 2), 4  # 64 -> 128 (spec table §2)
    k_d, k_h, k_w = KERNEL
    layer = TenVOOConv3d(nn.Conv3d(64, 128, KERNEL, padding=(1, 2, 0)), rank=r, mode=mode)
    if mode == "l":
        expected = r**2 * (f[0] * f[1] + g[0] * g[1]) + r**3 * (f[2] + k_d + k_h + k_w + g[2] + 1) + 2 * r**4
    else:
        expected = r**2 * (f[0] * f[1] + g[0] * g[1] + k_h) + r**3 * (f[2] + k_d + k_w + g[2]) + 3 * r**4
    assert sum(core.numel() for core in layer.cores.values()) == expected
    assert layer.cores["2"].shape[0] == k_d and layer.cores["3"].shape[0] == k_h and layer.cores["4"].shape[0] == k_w
    with torch.no_grad():
        for j, (key, core) in enumerate(layer.cores.items()):
            layer.cores[key] = nn.Parameter(torch.sin(0.1 * torch.arange(core.numel(), dtype=torch.float64) + j).reshape(core.shape))
    cores = [layer.cores[str(key)].detach().numpy() for key in range(10)]
    reference = np.einsum(SPEC_L if mode == "l" else SPEC_Q, *cores, optimize="greedy")
    reference = reference.reshape(64, k_d, k_h, k_w, 128).transpose(4, 0, 1, 2, 3)
    delta = layer.delta_weight().detach().numpy()
    assert delta.shape == (128, 64, *KERNEL)
    assert float(np.abs(delta - reference).max() / np.abs(reference).max()) < 1e-9


# spec §6.1, TenVOO columns (k = 3): (c_in, c_out) -> {rank: (L, Q)}; the existing O1 test has six of these
TABLE_6_1 = {
    (64, 128): {4: (2_944, 2_992), 8: (21_504, 23_744), 16: (212_992, 262_912)},
    (128, 128): {4: (3_456, 3_504), 8: (23_552, 25_792), 12: (84_096, 98_352), 16: (221_184, 271_104)},
    (256, 256): {4: (3_712, 3_760), 8: (25_600, 27_840), 16: (237_568, 287_488)},
    (512, 512): {4: (5_760, 5_808), 8: (33_792, 36_032), 16: (270_336, 320_256)},
    (1024, 512): {4: (7_808, 7_856)},
    (32, 32): {4: (1_920, 1_968), 8: (17_408, 19_648), 16: (196_608, 246_528)},
}


@pytest.mark.parametrize("c_in, c_out", list(TABLE_6_1))
def test_table_6_1_conv_counts(c_in, c_out):
    for rank, (expected_l, expected_q) in TABLE_6_1[(c_in, c_out)].items():
        base = nn.Conv3d(c_in, c_out, 3, device="meta")
        for mode, expected in (("l", expected_l), ("q", expected_q)):
            assert sum(core.numel() for core in TenVOOConv3d(base, rank, mode).cores.values()) == expected, (rank, mode)


PAPER_UNET_ARGS = dict(spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=2, channels=(32, 32, 64, 128, 256, 512),
                       attention_levels=(False, False, False, False, True, True), norm_num_groups=32, norm_eps=1e-6,
                       num_head_channels=(0, 0, 0, 0, 256, 512))


# spec §6.2 / §6.3 rows the existing O3 test leaves out: (method, rank, trainable, adapter-only, conv part, linear part)
TABLE_6_3 = [
    ("tenvoo-l", 2, 411_328, 349_696, None, None),
    ("tenvoo-l", 4, 601_024, 539_392, 199_424, 339_968),
    ("tenvoo-l", 8, 1_915_072, 1_853_440, None, 447_488),
    ("tenvoo-l", 16, 14_378_176, 14_316_544, None, None),
    ("tenvoo-q", 2, 411_088, None, None, None),
    ("tenvoo-q", 3, 482_112, None, None, None),
    ("tenvoo-q", 4, 603_904, 542_272, 202_304, 339_968),
    ("tenvoo-q", 8, 2_049_472, 1_987_840, None, None),
    ("tenvoo-q", 12, 6_628_608, 6_566_976, None, None),
    ("tenvoo-q", 16, 17_373_376, 17_311_744, None, None),
]


@pytest.mark.parametrize("method, rank, trainable, adapter, conv, linear", TABLE_6_3)
def test_table_6_3_whole_unet_counts(method, rank, trainable, adapter, conv, linear):
    from monai.networks.nets import DiffusionModelUNet

    from medgen.peft import inject, trainable_parameters
    from medgen.peft.tenvoo_layer import TenVOOLayer

    with torch.device("meta"):
        unet = DiffusionModelUNet(**PAPER_UNET_ARGS)
        inject(unet, method, preset="tenvoo-paper", rank=rank)
    layers = [module for module in unet.modules() if isinstance(module, TenVOOLayer)]
    sizes = {kind: sum(sum(core.numel() for core in layer.cores.values()) for layer in layers if isinstance(layer, kind))
             for kind in (TenVOOConv3d, TenVOOLayer)}
    assert trainable_parameters(unet) == trainable
    assert trainable - sizes[TenVOOLayer] == 61_632  # wrapped-layer biases 23,168 + norms 38,464 (§6.3)
    if adapter is not None:
        assert sizes[TenVOOLayer] == adapter
    if conv is not None:
        assert sizes[TenVOOConv3d] == conv
    if linear is not None:
        assert sizes[TenVOOLayer] - sizes[TenVOOConv3d] == linear
