"""Fold adapters into plain layers for inference."""

from __future__ import annotations

import sys

import torch
from torch import nn

from medgen.errors import BadInputError
from medgen.peft.inject import RECORD_ATTRIBUTE, adapter_record
from medgen.peft.tenvoo_layer import TenVOOLayer


def hf_tuner_layer_class() -> type | None:
    """peft's ``BaseTunerLayer`` class, or ``None`` when peft was never imported (then no such layer exists)."""
    # peft layers can only exist if peft was imported; avoid importing it (and transformers) otherwise
    if "peft" not in sys.modules:
        return None
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer


def merge(model: nn.Module) -> nn.Module:
    """Replace every TenVOO and peft (LoRA/IA3) layer of an adapted model by a plain layer, in place.

    The result has the base architecture and zero inference overhead; its outputs equal the adapted model's
    (within float32 rounding). Selection methods (bitfit, affine-norm, linear-probe, full) have nothing to fold.
    AdaptFormer and the spatial adapter are nonlinear branches: they stay in the network as ordinary modules.

    Args:
        model: a model returned by :func:`medgen.peft.inject`.

    Returns:
        The same object without adapter record (it can no longer be saved as an adapter).

    Raises:
        BadInputError: an adapted layer holds NaN or infinite values; the model is left unchanged
        (checked before folding anything, so a merge never stops half-way).
    """
    adapter_record(model)
    tuner_layer = hf_tuner_layer_class()
    foldable = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, TenVOOLayer) or (tuner_layer is not None and isinstance(module, tuner_layer))
    ]
    damaged = [name for name, module in foldable if not all(torch.isfinite(value).all() for value in module.parameters())]
    if damaged:
        raise BadInputError(
            f"cannot merge: {len(damaged)} adapted layer(s) hold NaN or infinite values (first: {damaged[0]}); "
            "the adapter was damaged in training or on disk, so retrain it or load an earlier checkpoint"
        )
    for name, module in foldable:
        if isinstance(module, TenVOOLayer):
            plain = module.merged()
        else:
            module.merge(safe_merge=True)
            plain = module.get_base_layer()
        model.set_submodule(name, plain)
    delattr(model, RECORD_ATTRIBUTE)
    return model
