"""Model specs, safe weight loading, MONAI bundles, Swin-UNETR zoo checkpoints and deepbet.

Public API::

    load_model(folder) -> (network, spec)         save_model(network, spec, folder) -> spec
    weights_hash(network_or_state_dict) -> str    ModelSpec / Preprocessing (model.json)
    load_bundle(folder) -> (network, spec)        load_swin_zoo_checkpoint(path) -> (network, spec)
    load_deepbet("bbox" | "full") -> network      deepbet_preprocess(volume) -> (1, 1, D, H, W)

A segmentation network with its preprocessing, used by adaptation and by the maskgen checker, is in
:mod:`medgen.models.segmentation` (``load_segmentation_model``, ``segment``, ``predict_probabilities``).
"""

from medgen.models.bundle import load_bundle
from medgen.models.deepbet import deepbet_preprocess, deepbet_spec, load_deepbet
from medgen.models.registry import allowed_networks, build_network, register_network
from medgen.models.spec import ModelSpec, Preprocessing, read_spec, write_spec
from medgen.models.store import build_model, load_model, save_model
from medgen.models.swin_zoo import LegacyPatchMerging, load_swin_zoo_checkpoint, normalize_swin_state_dict
from medgen.models.torchscript_weights import read_torchscript_tensors
from medgen.models.weights import load_state_dict_checked, read_safetensors, torch_load_weights, weights_hash

__all__ = [
    "LegacyPatchMerging",
    "ModelSpec",
    "Preprocessing",
    "allowed_networks",
    "build_model",
    "build_network",
    "deepbet_preprocess",
    "deepbet_spec",
    "load_bundle",
    "load_deepbet",
    "load_model",
    "load_state_dict_checked",
    "load_swin_zoo_checkpoint",
    "normalize_swin_state_dict",
    "read_safetensors",
    "read_spec",
    "read_torchscript_tensors",
    "register_network",
    "save_model",
    "torch_load_weights",
    "weights_hash",
    "write_spec",
]
