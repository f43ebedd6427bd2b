"""Model folders: ``model.json`` (a :class:`ModelSpec`) next to safetensors weights."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from torch import nn

from medgen.errors import ModelError
from medgen.models.registry import build_network
from medgen.models.spec import SPEC_FILE, ModelSpec, read_spec, write_spec
from medgen.models.weights import (
    load_state_dict_checked,
    read_safetensors,
    state_dict_differences,
    weights_hash,
    write_safetensors,
)


def build_model(spec: ModelSpec) -> nn.Module:
    """A freshly initialised network as the spec describes (no weights loaded)."""
    return build_network(spec.network, spec.kwargs)


def load_model(folder_or_spec: str | os.PathLike, verify_hash: bool = True) -> tuple[nn.Module, ModelSpec]:
    """Build the network of a model folder and load its weights, on the CPU in eval mode.

    Args:
        folder_or_spec: a model folder, or the path of its ``model.json``.
        verify_hash: compare the weights with the spec's ``weights_hash`` (when it has one).

    Returns:
        ``(network, spec)``; move the network to a device with ``.to(device)``.

    Raises:
        ModelError: missing or corrupted files, a network class off the allow-list, weights that do not
            fit the network (listing keys), or weights whose hash differs from the spec's.
    """
    path = Path(folder_or_spec)
    folder = path if path.is_dir() else path.parent
    spec = read_spec(path)
    weights_path = folder / spec.weights_file
    state_dict = read_safetensors(weights_path)
    if verify_hash and spec.weights_hash:
        found_hash = weights_hash(state_dict)
        if found_hash != spec.weights_hash:
            raise ModelError(
                f"Weights {weights_path} have hash {found_hash} but the spec expects {spec.weights_hash}: "
                "the file was replaced or damaged. Restore the original weights or save the model again."
            )
    network = build_model(spec)
    load_state_dict_checked(network, state_dict, source=str(weights_path))
    return network.eval(), spec


def save_model(model: nn.Module, spec: ModelSpec, folder: str | os.PathLike) -> ModelSpec:
    """Write ``model``'s weights and the spec into ``folder`` (both atomically; weights first).

    The spec written (and returned) carries the weights' hash, so adapters can name this model.

    Raises:
        ModelError: the model's state dict does not fit the network the spec describes.
    """
    folder = Path(folder)
    state_dict = model.state_dict()
    # building the spec's network proves that load_model will be able to rebuild this model
    missing, unexpected, mismatched = state_dict_differences(build_model(spec), state_dict)
    if missing or unexpected or mismatched:
        raise ModelError(
            f"Model {type(model).__name__} does not match the spec's network {spec.network}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatches {mismatched[:5]}. "
            "Merge or remove adapters before saving, or fix the spec's network arguments."
        )
    saved_spec = dataclasses.replace(spec, weights_hash=weights_hash(state_dict))
    write_safetensors(state_dict, folder / saved_spec.weights_file)
    write_spec(saved_spec, folder / SPEC_FILE)
    return saved_spec
