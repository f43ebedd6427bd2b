"""LoRA and IA3 through Hugging Face ``peft`` (supports ``nn.Conv3d`` since peft 0.14).

Only the peft tuners that accept ``nn.Conv3d`` are exposed: LoRA and IA3 (LoHa, LoKr, OFT, BOFT, HRA, FourierFT
and VeRA reject it, spec tenvoo.md §10). ``target_modules`` is resolved here with ``re.search`` and handed to peft
as one anchored regex of the exact names, so every MedGen method matches names the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from medgen.errors import BadInputError
from medgen.peft.config import MethodConfig, match_modules, select_types

HF_SUPPORTED_TYPES = (nn.Linear, nn.Conv3d)


@dataclass
class LoRAConfig(MethodConfig):
    """Options of ``lora``.

    Args:
        rank: rank r of the low-rank update.
        alpha: scaling numerator; the update is scaled by alpha / rank. ``None`` = rank (scale 1, as FSEFT).
        dropout: dropout on the LoRA branch input (0–1).
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        # checked here so that a bad option is a clear error, not a peft traceback
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise BadInputError(f"LoRA rank must be a whole number >= 1; got {self.rank!r}.")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0):
            raise BadInputError(f"LoRA alpha must be a positive number (or left out: alpha = rank); got {self.alpha!r}.")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise BadInputError(f"LoRA dropout must be a probability in [0, 1); got {self.dropout!r}.")


@dataclass
class IA3Config(MethodConfig):
    """Options of ``ia3`` (learned per-output-channel scaling vectors, initialised to 1)."""


def _target_names(model: nn.Module, config: MethodConfig, method: str) -> list[str]:
    matches = match_modules(model, config.target_modules)
    return [name for name, _ in select_types(matches, HF_SUPPORTED_TYPES, method, config.target_modules is not None)]


def _exact_names_pattern(names: list[str]) -> str:
    """A regex that peft full-matches against exactly ``names``.

    A list given to peft would match by suffix (``block.conv`` ends with ``.conv``), wrapping layers MedGen did not
    select; a string is matched with ``re.fullmatch``.
    """
    return "|".join(re.escape(name) for name in names)


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Inject peft LoRA layers into the matched layers in place; returns their names."""
    import peft

    names = _target_names(model, config, "lora")
    alpha = config.rank if config.alpha is None else config.alpha
    lora_config = peft.LoraConfig(
        r=config.rank, lora_alpha=alpha, lora_dropout=config.dropout,
        target_modules=_exact_names_pattern(names), bias="none",
    )
    peft.inject_adapter_in_model(lora_config, model)
    return names


def apply_ia3(model: nn.Module, config: IA3Config) -> list[str]:
    """Inject peft IA3 scaling vectors into the matched layers in place; returns their names."""
    import peft

    names = _target_names(model, config, "ia3")
    ia3_config = peft.IA3Config(target_modules=_exact_names_pattern(names), feedforward_modules=[])
    peft.inject_adapter_in_model(ia3_config, model)
    return names
