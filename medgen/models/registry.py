"""The allow-list of network classes a model spec may name, and building a network from a spec.

A spec names a class, never an import path, so a model folder cannot make MedGen import or run
arbitrary code. MONAI networks are looked up lazily in ``monai.networks.nets``; MedGen's own
networks and those other MedGen packages add register themselves with :func:`register_network`.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from torch import nn

from medgen.errors import MedGenError, ModelError

#: MONAI network classes a spec may name (all live in ``monai.networks.nets``)
MONAI_NETWORKS = (
    "AttentionUnet",
    "AutoencoderKL",
    "BasicUNet",
    "BasicUNetPlusPlus",
    "ControlNet",
    "DiffusionModelUNet",
    "DynUNet",
    "FlexibleUNet",
    "MedNeXt",
    "SegResNet",
    "SegResNetDS",
    "SwinUNETR",
    "UNETR",
    "UNet",
    "VNet",
    "VQVAE",
)

#: constructor arguments with which MONAI networks download pretrained weights (FlexibleUNet's backbones from
#: GitHub or Hugging Face, ResNet's MedicalNet weights): refused, since nothing may reach the network unasked
DOWNLOADING_ARGUMENTS = ("pretrained",)

#: name -> "module:attribute" of MedGen's own networks, imported only when a spec names them
_MEDGEN_NETWORKS: dict[str, str] = {
    "LinkNet3d": "medgen.models.linknet3d:LinkNet3d",
}

_registered: dict[str, Callable[..., nn.Module]] = {}


def register_network(name: str, factory: Callable[..., nn.Module]) -> None:
    """Allow specs to name ``name``; ``factory(**kwargs)`` must return the network."""
    _registered[name] = factory


def allowed_networks() -> list[str]:
    """Every class name a spec may use, sorted."""
    return sorted({*MONAI_NETWORKS, *_MEDGEN_NETWORKS, *_registered})


def network_factory(name: str) -> Callable[..., nn.Module]:
    """The class (or factory) behind an allowed network name.

    Raises:
        ModelError: ``name`` is not on the allow-list.
    """
    if name in _registered:
        return _registered[name]
    if name in _MEDGEN_NETWORKS:
        module_name, attribute = _MEDGEN_NETWORKS[name].split(":")
        return getattr(importlib.import_module(module_name), attribute)
    if name in MONAI_NETWORKS:
        return getattr(importlib.import_module("monai.networks.nets"), name)
    raise ModelError(
        f"Unknown network class {name!r}. A model spec may name only one of: {', '.join(allowed_networks())}."
    )


def resolve_swin_downsample(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Turn ``"downsample": "merging_legacy"`` into the legacy-order patch-merging class (see swin_zoo)."""
    if kwargs.get("downsample") != "merging_legacy":
        return kwargs
    from medgen.models.swin_zoo import LegacyPatchMerging

    return {**kwargs, "downsample": LegacyPatchMerging}


def build_network(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """Instantiate an allowed network with keyword arguments from a spec.

    Raises:
        ModelError: unknown class, or arguments the class rejects.
    """
    factory = network_factory(name)
    downloading = sorted(key for key in kwargs if key in DOWNLOADING_ARGUMENTS and kwargs[key])
    if downloading:
        raise ModelError(
            f"Network {name} with {downloading} would download weights at run time (MONAI fetches them from the "
            "internet); MedGen loads weights only from the model folder. Set them to false and put the weights there."
        )
    if name == "SwinUNETR":
        kwargs = resolve_swin_downsample(kwargs)
    try:
        return factory(**kwargs)
    except MedGenError:
        raise
    except Exception as error:  # MONAI's constructors also fail with IndexError, ZeroDivisionError, NotImplementedError
        raise ModelError(f"Could not build network {name} with arguments {kwargs}: {type(error).__name__}: {error}") from error
