"""What an adapted model trains: counts and a per-layer description."""

from __future__ import annotations

from typing import Any

from torch import nn

from medgen.peft.adaptformer import AdaptFormerBlock
from medgen.peft.inject import adapter_record
from medgen.peft.merge import hf_tuner_layer_class
from medgen.peft.spatial_adapter import SpatialAdapter
from medgen.peft.tenvoo_layer import TenVOOLayer


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (``requires_grad``), each shared parameter counted once."""
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def trains_whole_model(model: nn.Module) -> bool:
    """True when every parameter is trainable (full fine-tuning): only then may training update BatchNorm
    statistics, which an adapter of a partly frozen model does not store (it would no longer fit its base)."""
    return all(parameter.requires_grad for parameter in model.parameters())


def _count_trainable(parameters) -> int:
    return sum(parameter.numel() for parameter in parameters if parameter.requires_grad)


def describe(model: nn.Module) -> dict[str, Any]:
    """Which layers got what.

    Returns:
        ``{"method", "preset", "options", "trainable_parameters", "total_parameters", "trainable_percent",
        "layers": [{"name", "type", "role", "trainable_parameters"}, ...]}``. ``role`` is ``"adapter"`` for a layer
        the method added or wrapped (all its trainable parameters counted there) and ``"unfrozen"`` for an original
        module whose own parameters are trained (biases, norms, head, decoder, ...).
    """
    record = adapter_record(model)
    adapter_types = (TenVOOLayer, AdaptFormerBlock, SpatialAdapter) + tuple(filter(None, [hf_tuner_layer_class()]))
    layers, adapter_prefixes = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in adapter_prefixes):
            continue
        if isinstance(module, adapter_types):
            adapter_prefixes.append(name + ".")
            role, count = "adapter", _count_trainable(module.parameters())
        else:
            role, count = "unfrozen", _count_trainable(module.parameters(recurse=False))
        if count:
            layers.append({"name": name, "type": type(module).__name__, "role": role, "trainable_parameters": count})
    trainable = trainable_parameters(model)
    total = sum(parameter.numel() for parameter in model.parameters())
    return {
        "method": record.method,
        "preset": record.preset,
        "options": record.options,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_percent": 100.0 * trainable / total if total else 0.0,
        "layers": layers,
    }
