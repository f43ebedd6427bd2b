"""LoRA and IA3 through Hugging Face ``peft`` (supports ``nn.Conv3d`` since peft 0.14).

Only the peft tuners that accept ``nn.Conv3d`` are exposed: LoRA and IA3 (LoHa, LoKr, OFT, BOFT, HRA, FourierFT
and VeRA reject it, spec tenvoo.md §10). ``target_modules`` is resolved here with ``re.search`` and handed to peft
as one anchored regex of the exact names, so every MedGen method matches names the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
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
        dropout: dropout on the LoRA branch input (0–1), active in training steps (see :class:`BranchDropout`).
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0

    POSITIVE = (*MethodConfig.POSITIVE, "rank")

    def __post_init__(self) -> None:
        super().__post_init__()
        # checked here so that a bad option is a clear error, not a peft traceback (the types are checked above)
        if self.alpha is not None and self.alpha <= 0:
            raise BadInputError(f"LoRA alpha must be a positive number (or left out: alpha = rank); got {self.alpha!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise BadInputError(f"LoRA dropout must be a probability in [0, 1); got {self.dropout!r}.")


class BranchDropout(nn.Dropout):
    """Dropout on an adapter branch: on in a forward that records gradients (a training step) or in ``train()``
    mode, off otherwise.

    MedGen trains partly frozen models in ``eval()`` mode (FSEFT quirk Q18: the frozen base's BatchNorm statistics
    and dropouts stay as pretrained), which would switch an ordinary ``nn.Dropout`` on the LoRA branch off for good.
    Inference runs under ``torch.no_grad()``, so it stays deterministic.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(x, self.p, self.training or torch.is_grad_enabled(), self.inplace)


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


def _lora_conv_problems(conv: nn.Conv3d) -> list[str]:
    """What peft's LoRA branch of ``conv`` would get wrong: it copies only kernel size, stride and padding.

    A dilated layer's branch output has another size (every forward fails), another padding mode makes the merged
    layer differ from the adapted one, and grouped layers cannot be merged.
    """
    problems = []
    if any(d != 1 for d in conv.dilation):
        problems.append(f"dilation {tuple(conv.dilation)}")
    if conv.groups != 1:
        problems.append(f"groups={conv.groups}")
    if conv.padding_mode != "zeros":
        problems.append(f"padding_mode={conv.padding_mode!r}")
    return problems


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Inject peft LoRA layers into the matched layers in place; returns their names.

    Raises:
        BadInputError: a matched Conv3d is dilated, grouped or pads other than with zeros (see
            :func:`_lora_conv_problems`); narrow ``target_modules`` or use TenVOO, which supports dilation and
            padding modes.
    """
    import peft

    names = _target_names(model, config, "lora")
    unfit = [(name, problems) for name in names if isinstance(module := model.get_submodule(name), nn.Conv3d)
             and (problems := _lora_conv_problems(module))]
    if unfit:
        listed = "; ".join(f"{name}: {', '.join(problems)}" for name, problems in unfit[:8])
        raise BadInputError(
            f"LoRA (Hugging Face peft) supports only plain Conv3d layers (no dilation, groups=1, zero padding), but "
            f"{len(unfit)} matched layer(s) are not: {listed}{' …' if len(unfit) > 8 else ''}. Leave them out with "
            "target_modules, or use TenVOO (dilation and padding modes supported)."
        )
    alpha = config.rank if config.alpha is None else config.alpha
    lora_config = peft.LoraConfig(
        r=config.rank, lora_alpha=alpha, lora_dropout=config.dropout,
        target_modules=_exact_names_pattern(names), bias="none",
    )
    peft.inject_adapter_in_model(lora_config, model)
    if config.dropout:
        for name in names:
            branch_dropouts = model.get_submodule(name).lora_dropout
            for adapter in branch_dropouts:
                branch_dropouts[adapter] = BranchDropout(config.dropout)
    return names


def apply_ia3(model: nn.Module, config: IA3Config) -> list[str]:
    """Inject peft IA3 scaling vectors into the matched layers in place; returns their names."""
    import peft

    names = _target_names(model, config, "ia3")
    ia3_config = peft.IA3Config(target_modules=_exact_names_pattern(names), feedforward_modules=[])
    peft.inject_adapter_in_model(ia3_config, model)
    return names
