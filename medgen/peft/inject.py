"""The one entry point that adapts a model: freeze the base, add the method's trainable parts, record what was done."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from medgen.errors import BadInputError
from medgen.peft.config import MethodConfig, compile_patterns
from medgen.peft.methods import METHODS
from medgen.peft.presets import resolve_preset
from medgen.peft.rollback import restored_on_error

#: attribute of an adapted model holding its :class:`AdapterRecord`
RECORD_ATTRIBUTE = "_medgen_peft"


@dataclass
class AdapterRecord:
    """What :func:`inject` did, enough to redo it on a fresh base model (stored in the adapter config file).

    Args:
        method: method name.
        preset: preset name or ``None``.
        options: the user's options as passed to :func:`inject` (JSON-serialisable to be saved).
        adapted_modules: names of the modules the method wrapped or unfroze.
    """

    method: str
    preset: str | None
    options: dict[str, Any]
    adapted_modules: list[str] = field(default_factory=list)


def adapter_record(model: nn.Module) -> AdapterRecord:
    """The record of an adapted model; ``BadInputError`` if ``model`` was not adapted with :func:`inject`."""
    record = getattr(model, RECORD_ATTRIBUTE, None)
    if record is None:
        raise BadInputError(f"this {type(model).__name__} carries no MedGen adapter; call medgen.peft.inject first.")
    return record


def _build_config(method: str, options: dict[str, Any]) -> MethodConfig:
    config_class = METHODS[method].config_class
    allowed = {item.name for item in dataclasses.fields(config_class)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise BadInputError(f"{method} does not take options {unknown}; it takes {sorted(allowed)}.")
    return config_class(**options)


def _new_head(head: nn.Module, rows: list[int] | None, out_channels: int | None) -> nn.Module:
    """A copy of ``head`` with other outputs: the listed pre-trained rows, or ``out_channels`` fresh ones."""
    if rows is not None:
        outputs = head.weight.shape[0]
        if any(row < 0 or row >= outputs for row in rows):
            raise BadInputError(f"head_rows {list(rows)} must be rows 0..{outputs - 1} of the pre-trained head "
                                f"({outputs} outputs).")
        fresh = copy.deepcopy(head)
        index = torch.as_tensor(rows, dtype=torch.long, device=head.weight.device)
        fresh.weight = nn.Parameter(head.weight.detach().index_select(0, index).clone())
        if head.bias is not None:
            fresh.bias = nn.Parameter(head.bias.detach().index_select(0, index).clone())
        if isinstance(fresh, nn.Conv3d):
            fresh.out_channels = len(rows)
        else:
            fresh.out_features = len(rows)
        return fresh
    factory = {"device": head.weight.device, "dtype": head.weight.dtype}
    bias = head.bias is not None
    if isinstance(head, nn.Conv3d):
        if out_channels % head.groups:
            raise BadInputError(f"head_out_channels {out_channels} must be a multiple of the head's groups={head.groups}.")
        return nn.Conv3d(head.in_channels, out_channels, head.kernel_size, head.stride, head.padding, head.dilation,
                         head.groups, bias, head.padding_mode, **factory)
    return nn.Linear(head.in_features, out_channels, bias=bias, **factory)


def _prepare_head(model: nn.Module, config: MethodConfig) -> nn.Module:
    """The head module (replaced first if ``head_rows``/``head_out_channels`` ask for it)."""
    try:
        head = model.get_submodule(config.head)
    except AttributeError as error:
        raise BadInputError(f"head {config.head!r} is not a module of this {type(model).__name__}.") from error
    if not isinstance(head, (nn.Conv3d, nn.Linear)):
        raise BadInputError(f"head must be a Conv3d or Linear layer; {config.head!r} is a {type(head).__name__}.")
    if config.head_rows is not None or config.head_out_channels is not None:
        head = _new_head(head, config.head_rows, config.head_out_channels)
        model.set_submodule(config.head, head)
    return head


def inject(model: nn.Module, method: str, *, preset: str | None = None, **options: Any) -> nn.Module:
    """Adapt ``model`` in place: freeze every parameter, then add/unfreeze what ``method`` trains.

    Args:
        model: any ``nn.Module`` (e.g. MONAI ``DiffusionModelUNet`` or ``SwinUNETR``), not adapted yet.
        method: one of ``tenvoo-l``, ``tenvoo-q``, ``lora``, ``ia3``, ``bitfit``, ``affine-norm``,
            ``adaptformer``, ``linear-probe``, ``spatial-adapter``, ``full``.
        preset: ``"tenvoo-paper"`` or ``"fseft"`` (see :mod:`medgen.peft.presets`); options override it.
        **options: fields of the method's config dataclass (``target_modules`` regexes, ``rank``, ``head``, ...).

    Returns:
        The same ``model`` object, adapted.

    Raises:
        BadInputError: unknown method/preset/option, a regex that matches nothing, an unsupported layer type.
            After any error ``model`` is unchanged (same modules, hooks and ``requires_grad`` flags, no record).
    """
    if method not in METHODS:
        raise BadInputError(f"unknown adaptation method {method!r}; choose one of {list(METHODS)}.")
    if getattr(model, RECORD_ATTRIBUTE, None) is not None:
        raise BadInputError("this model already carries an adapter; merge it first or start from a fresh base model.")
    config = _build_config(method, resolve_preset(preset, method, options))
    if config.train_also is not None:
        patterns = compile_patterns(config.train_also, "train_also")
    # a method can fail half-way (e.g. TenVOO on the n-th layer): undo the freezing and the wrapped layers then
    with restored_on_error(model):
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        head = _prepare_head(model, config) if config.head is not None else None
        adapted = METHODS[method].apply(model, config)
        if head is not None:
            for parameter in head.parameters():
                parameter.requires_grad_(True)
            adapted.append(config.head)
        if config.train_also is not None:
            for name, parameter in model.named_parameters():
                if any(pattern.search(name) for pattern in patterns):
                    parameter.requires_grad_(True)
    setattr(model, RECORD_ATTRIBUTE, AdapterRecord(method, preset, dict(options), adapted))
    return model
