"""Shared machinery of the TenVOO layers: cores, their frozen initial copy, and the precise weight update.

Hand-written: no library implements TenVOO. The layer keeps the base weight W0 untouched (spec tenvoo.md §3.7,
quirk Q2) and adds ΔW(θ) − ΔW(θ0), where θ are the trainable cores and θ0 their frozen copy at initialisation.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Mapping

import torch
from torch import nn

from medgen.errors import BadInputError

#: initialisations of spec §3.5: all cores random with a frozen copy (compat default), or the last core zeroed too
INIT_MODES = ("sum_opposite_freeze_one", "last_layer_zero")


class FrozenCores(nn.Module):
    """The cores θ0 at initialisation, held as persistent buffers so an adapter file can restore them.

    Args:
        cores: the freshly initialised trainable cores; their values are copied.
    """

    def __init__(self, cores: nn.ParameterDict) -> None:
        super().__init__()
        for key, core in cores.items():
            self.register_buffer(key, core.detach().clone())

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The frozen cores by key, in the order of the trainable cores."""
        return dict(self.named_buffers(recurse=False))


def _no_autocast(device: torch.device):
    """Disable autocast around the contraction: the update is a small difference of O(1) tensors (spec Q13)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def uniform_bound_4d(shape: tuple[int, ...]) -> float:
    """Kaiming-uniform bound with the ReLU gain for a 4-D core, whose fan-in is the product of its last two axes."""
    return math.sqrt(6.0 / (shape[-2] * shape[-1]))


class TenVOOLayer(nn.Module):
    """Base of :class:`TenVOOConv3d` and :class:`TenVOOLinear`: a frozen layer plus a tensor-network update.

    Subclasses give the core shapes, their initialisation bounds, the core zeroed by ``last_layer_zero`` and the
    contraction :meth:`_contract`.

    Args:
        base: the layer to adapt (``nn.Conv3d`` or ``nn.Linear``); its weight is frozen and never modified.
        core_shapes: ordered mapping core key -> shape; the key order is the initialisation order.
        core_bounds: core key -> half-width of the uniform initialisation.
        zero_key: the core zeroed by ``init="last_layer_zero"``.
        init: one of :data:`INIT_MODES`.
    """

    def __init__(
        self,
        base: nn.Module,
        core_shapes: Mapping[str, tuple[int, ...]],
        core_bounds: Mapping[str, float],
        zero_key: str,
        init: str,
    ) -> None:
        super().__init__()
        if init not in INIT_MODES:
            raise BadInputError(f"TenVOO init must be one of {list(INIT_MODES)}, got {init!r}.")
        self.base = base
        self.base.weight.requires_grad_(False)
        self.init_mode = init
        device = base.weight.device
        self.cores = nn.ParameterDict(
            {key: nn.Parameter(torch.empty(shape, device=device)) for key, shape in core_shapes.items()}
        )
        with torch.no_grad():
            for key, core in self.cores.items():
                core.uniform_(-core_bounds[key], core_bounds[key])
            if init == "last_layer_zero":
                self.cores[zero_key].zero_()
        self.cores_init = FrozenCores(self.cores)

    def _contract(self, cores: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Contract float64 ``cores`` into a float64 update shaped like ``base.weight``."""
        raise NotImplementedError

    def _contract_fp64(self, cores: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # float64 is never TF32 and never touched by autocast, so the update is exact to ~1e-16 (spec Q13)
        with _no_autocast(self.base.weight.device):
            return self._contract({key: core.to(torch.float64) for key, core in cores.items()})

    def delta_weight(self) -> torch.Tensor:
        """ΔW(θ) of the current cores, float64, shaped like ``base.weight`` (differentiable in the cores)."""
        return self._contract_fp64(dict(self.cores.items()))

    def weight_update(self) -> torch.Tensor:
        """ΔW(θ) − ΔW(θ0), float64: what is added to W0; exactly 0 at initialisation."""
        with torch.no_grad():
            initial_delta = self._contract_fp64(self.cores_init.as_dict())
        return self.delta_weight() - initial_delta

    def adapted_weight(self) -> torch.Tensor:
        """W0 + ΔW(θ) − ΔW(θ0) in the base weight's dtype."""
        return self.base.weight + self.weight_update().to(self.base.weight.dtype)

    def merged(self) -> nn.Module:
        """A plain copy of the base layer carrying the adapted weight (no adapter left, zero overhead)."""
        plain = copy.deepcopy(self.base)
        with torch.no_grad():
            plain.weight.copy_(self.adapted_weight())
        return plain
