"""TenVOO-L / TenVOO-Q as a method: which layers get wrapped and what else is trained (spec tenvoo.md §5)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medgen.peft.config import MethodConfig, match_modules, select_types
from medgen.peft.tenvoo_conv import TenVOOConv3d
from medgen.peft.tenvoo_layer import TenVOOLayer, prepare_updates, release_updates
from medgen.peft.tenvoo_linear import TenVOOLinear


@dataclass
class TenVOOConfig(MethodConfig):
    """Options of ``tenvoo-l`` / ``tenvoo-q``.

    Args:
        rank: bond dimension r of the conv networks and rank of unequal Linear gates (released recipe: 4).
        init: "sum_opposite_freeze_one" (released default) or "last_layer_zero".
        train_bias: also train the biases of the wrapped layers (released ``bias="lora_only"``).
        train_norms: also train every parameter whose name contains "norm" (the released rule; it catches all
            GroupNorms of a MONAI DiffusionModelUNet, including the non-adapted middle block, but not ``out.0``).
        exclude_first_last_conv: skip matched Conv3d layers with 1 input or 1 output channel.
        factor_table: extra channel factorisations ``{C: [f0, f1, f2]}`` for sizes missing from the shipped table.
    """

    rank: int = 4
    init: str = "sum_opposite_freeze_one"
    train_bias: bool = True
    train_norms: bool = True
    exclude_first_last_conv: bool = True
    factor_table: dict[int, list[int]] | None = None

    POSITIVE = (*MethodConfig.POSITIVE, "rank")


def apply_tenvoo(model: nn.Module, config: TenVOOConfig, mode: str) -> list[str]:
    """Wrap the matched ``Conv3d``/``Linear`` layers of ``model`` in place; returns the wrapped names.

    Args:
        model: the network with all parameters already frozen.
        config: the method options.
        mode: "l" or "q".
    """
    matches = match_modules(model, config.target_modules)
    layers = select_types(matches, (nn.Conv3d, nn.Linear), f"tenvoo-{mode}", config.target_modules is not None)
    wrapped_names = []
    for name, layer in layers:
        if isinstance(layer, nn.Conv3d):
            if config.exclude_first_last_conv and 1 in (layer.in_channels, layer.out_channels):
                continue
            wrapper = TenVOOConv3d(layer, config.rank, mode, config.init, config.factor_table)
        else:
            wrapper = TenVOOLinear(layer, config.rank, config.init, config.factor_table)
        model.set_submodule(name, wrapper)
        if config.train_bias and layer.bias is not None:
            layer.bias.requires_grad_(True)
        wrapped_names.append(name)
    # module-level functions, not closures: a deep copy of the model must act on its own layers
    model.register_forward_pre_hook(_prepare_tenvoo_updates)
    model.register_forward_hook(_release_tenvoo_updates)
    if config.train_norms:
        for parameter_name, parameter in model.named_parameters():
            if "norm" in parameter_name.lower():
                parameter.requires_grad_(True)
    return wrapped_names


def _tenvoo_layers(model: nn.Module) -> list[TenVOOLayer]:
    # walked at every forward: merge() may have replaced layers since the hooks were registered
    return [module for module in model.modules() if isinstance(module, TenVOOLayer)]


def _prepare_tenvoo_updates(model: nn.Module, args: tuple) -> None:
    """Forward pre-hook: contract all layers' factors in batched groups before a training forward (without
    autograd each layer's cached weight is used instead)."""
    if torch.is_grad_enabled():
        prepare_updates(_tenvoo_layers(model))


def _release_tenvoo_updates(model: nn.Module, args: tuple, output) -> None:
    """Forward hook: drop operands the forward did not use, so no graph piece outlives it."""
    if torch.is_grad_enabled():
        release_updates(_tenvoo_layers(model))
