"""TenVOO adapter for ``nn.Linear``: the QuanTA-style three-gate network (spec tenvoo.md §4).

Hand-written. Features are split into three axes with the TenVOO factor table. When input and output
factorisations are equal the gates are the rank-free QuanTA gates; otherwise a rank-r variant is used. The update
matrix is M = einsum("uvQR,wZPv,XYwu->XYZPQR") of the cores '-1 -2', '-1 -3', '-2 -3', reshaped to (out, in).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from medgen.peft.tenvoo_factors import check_rank, factorize
from medgen.peft.tenvoo_layer import TenVOOLayer, contract_pair


def linear_core_shapes(in_factors: Sequence[int], out_factors: Sequence[int], rank: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the gates '-1 -2', '-1 -3', '-2 -3' (spec §4).

    Args:
        in_factors: (f0, f1, f2) of the input features.
        out_factors: (g0, g1, g2) of the output features.
        rank: rank r of the gates when the factorisations differ (unused when they are equal).
    """
    f0, f1, f2 = in_factors
    g0, g1, g2 = out_factors
    if tuple(in_factors) == tuple(out_factors):
        return {"-1 -2": (f1, f2, f1, f2), "-1 -3": (f0, f2, f0, f2), "-2 -3": (f0, f1, f0, f1)}
    r = rank
    return {"-1 -2": (r, r, f1, f2), "-1 -3": (r, g2, f0, r), "-2 -3": (g0, g1, r, r)}


class TenVOOLinear(TenVOOLayer):
    """A frozen ``nn.Linear`` plus the QuanTA-style TenVOO update; ``forward`` is the adapted linear map.

    Args:
        base: the linear layer to adapt; weight shape (out, in).
        rank: rank of the gates when in/out factorisations differ (rank-free when they are equal).
        init: "sum_opposite_freeze_one" or "last_layer_zero" (zeroes gate '-2 -3').
        factor_table: optional extra feature factorisations ``{C: (f0, f1, f2)}``.

    Attributes:
        cores: ``nn.ParameterDict`` with keys '-1 -2', '-1 -3', '-2 -3' (trainable).
        cores_init: the frozen copy θ0.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int = 4,
        init: str = "sum_opposite_freeze_one",
        factor_table: Mapping[int, Sequence[int]] | None = None,
    ) -> None:
        check_rank(rank)
        in_factors = factorize(base.in_features, factor_table)
        shapes = linear_core_shapes(in_factors, factorize(base.out_features, factor_table), rank)
        # linear gain 1: U(-b, b) with b = sqrt(3 / fan_in), fan_in = product of the gate's last two axes
        bounds = {key: math.sqrt(3.0 / (shape[-2] * shape[-1])) for key, shape in shapes.items()}
        super().__init__(base, shapes, bounds, zero_key="-2 -3", init=init)
        self.rank = rank

    #: the gates laid out for the contraction (see :attr:`TenVOOLayer.operand_layouts`)
    operand_layouts = {"-1 -2": ("uvQR", "uQRv"), "-1 -3": ("wZPv", "vwZP"), "-2 -3": ("XYwu", "XYuw")}

    def _factors(self, cores: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """G stacked gates '-2 -3' as (G, g0·g1, u·w) and the two other gates contracted over v, (G, u·w, g2·in)."""
        outer = cores["-2 -3"]
        inner = contract_pair("uQRv,vwZP->uwZPQR", cores["-1 -2"], cores["-1 -3"])
        groups, bonds = outer.shape[0], outer.shape[-2] * outer.shape[-1]
        return outer.reshape(groups, -1, bonds), inner.reshape(groups, bonds, -1)

    def _weight_view(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.view(self.base.weight.shape)  # rows (X, Y), columns (Z, P, Q, R): already (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Adapted linear map.

        Args:
            x: (..., in_features).

        Returns:
            (..., out_features).
        """
        return nn.functional.linear(x, self.adapted_weight(), self.base.bias)
