"""Methods that add no layers, only unfreeze existing parameters: BitFit, Affine-norm, linear probe, full FT."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from medgen.errors import BadInputError
from medgen.peft.config import MethodConfig, match_modules

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, _BatchNorm, _InstanceNorm)

#: Swin relative-position tables; FSEFT's BitFit trains them because their name contains "bias" (quirk Q4)
RELATIVE_POSITION_TABLE = "relative_position_bias_table"


@dataclass
class BitFitConfig(MethodConfig):
    """Options of ``bitfit`` (train the biases of the matched modules).

    Args:
        include_relpos_bias: also train Swin ``relative_position_bias_table`` parameters (FSEFT-compatible count).
    """

    include_relpos_bias: bool = False


@dataclass
class AffineNormConfig(MethodConfig):
    """Options of ``affine-norm`` (train the affine weight/bias of matched normalisation layers)."""


@dataclass
class LinearProbeConfig(MethodConfig):
    """Options of ``linear-probe`` (train only ``head``)."""


@dataclass
class FullConfig(MethodConfig):
    """Options of ``full`` (train every parameter)."""


def _unfreeze(parameters: list[nn.Parameter], method: str) -> None:
    if not parameters:
        raise BadInputError(f"{method} found no parameter to train in the modules matched by target_modules.")
    for parameter in parameters:
        parameter.requires_grad_(True)


def apply_bitfit(model: nn.Module, config: BitFitConfig) -> list[str]:
    """Unfreeze the ``bias`` of every matched module; returns the module names."""
    trained = {"bias", RELATIVE_POSITION_TABLE} if config.include_relpos_bias else {"bias"}
    names, parameters = [], []
    for name, module in match_modules(model, config.target_modules):
        own = [parameter for key, parameter in module.named_parameters(recurse=False) if key in trained]
        if own:
            names.append(name)
            parameters.extend(own)
    _unfreeze(parameters, "bitfit")
    return names


def apply_affine_norm(model: nn.Module, config: AffineNormConfig) -> list[str]:
    """Unfreeze the affine parameters of every matched normalisation layer; returns their names."""
    matches = match_modules(model, config.target_modules)
    norms = [(name, module) for name, module in matches if isinstance(module, NORM_TYPES)]
    _unfreeze([parameter for _, module in norms for parameter in module.parameters(recurse=False)], "affine-norm")
    return [name for name, module in norms if any(True for _ in module.parameters(recurse=False))]


def apply_linear_probe(model: nn.Module, config: LinearProbeConfig) -> list[str]:
    """Nothing besides the head (unfrozen by the injector); ``head`` is required."""
    if config.head is None:
        raise BadInputError("linear-probe needs head=<name of the output Conv3d/Linear>, e.g. head='out.conv.conv'.")
    return []


def apply_full(model: nn.Module, config: FullConfig) -> list[str]:
    """Unfreeze every parameter."""
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return []
