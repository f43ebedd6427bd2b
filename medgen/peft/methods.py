"""Registry of the adaptation methods: name -> config dataclass + function that applies it to a frozen model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import nn

from medgen.peft.adaptformer import AdaptFormerConfig, apply_adaptformer
from medgen.peft.config import MethodConfig
from medgen.peft.hf_tuners import IA3Config, LoRAConfig, apply_ia3, apply_lora
from medgen.peft.selection import (
    AffineNormConfig,
    BitFitConfig,
    FullConfig,
    LinearProbeConfig,
    apply_affine_norm,
    apply_bitfit,
    apply_full,
    apply_linear_probe,
)
from medgen.peft.spatial_adapter import SpatialAdapterConfig, apply_spatial_adapter
from medgen.peft.tenvoo import TenVOOConfig, apply_tenvoo


@dataclass(frozen=True)
class MethodSpec:
    """One method: its options dataclass and ``apply(model, config) -> adapted module names``."""

    config_class: type[MethodConfig]
    apply: Callable[[nn.Module, MethodConfig], list[str]]


METHODS: dict[str, MethodSpec] = {
    "tenvoo-l": MethodSpec(TenVOOConfig, partial(apply_tenvoo, mode="l")),
    "tenvoo-q": MethodSpec(TenVOOConfig, partial(apply_tenvoo, mode="q")),
    "lora": MethodSpec(LoRAConfig, apply_lora),
    "ia3": MethodSpec(IA3Config, apply_ia3),
    "bitfit": MethodSpec(BitFitConfig, apply_bitfit),
    "affine-norm": MethodSpec(AffineNormConfig, apply_affine_norm),
    "adaptformer": MethodSpec(AdaptFormerConfig, apply_adaptformer),
    "linear-probe": MethodSpec(LinearProbeConfig, apply_linear_probe),
    "spatial-adapter": MethodSpec(SpatialAdapterConfig, apply_spatial_adapter),
    "full": MethodSpec(FullConfig, apply_full),
}
