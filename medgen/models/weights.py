"""Safe reading, writing, hashing and checked loading of weight tensors.

Weights are read from safetensors (preferred) or from PyTorch pickles with
``torch.load(weights_only=True)`` only: a pickle that needs arbitrary Python objects is refused,
never executed. Every write goes to a temporary file in the target folder and is renamed into
place, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from medgen.errors import ModelError
from medgen.io.atomic import atomic_output

#: how many differing keys an error message lists before it says "and N more"
_KEYS_SHOWN = 5


def weights_hash(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a model's tensors, independent of the order of the state dict and of the device.

    Each tensor contributes its name, dtype, shape and raw bytes, in sorted-name order. Adapter
    files store this string to name the base model they fit.

    Args:
        model_or_state_dict: a module (its ``state_dict()`` is hashed, persistent buffers included)
            or a mapping from names to tensors.

    Returns:
        ``"sha256:"`` followed by 64 hex digits.
    """
    state_dict = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # viewing as bytes works for every dtype, bfloat16 included (numpy has no bfloat16)
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def starting_weights_hash(network: nn.Module) -> str:
    """:func:`weights_hash` of the base weights a fine-tuning run starts from, taken before it trains: with a PEFT
    method injected, the parameters that do not train (``requires_grad`` False), which training leaves as they are
    (buffers such as norm statistics, which training updates, are left out); with full fine-tuning, which trains
    every parameter, all of them (a resumed run restores its checkpoint only after this hash is taken), a head freshly
    initialised for new classes included: seed torch before injecting such a head to resume the run later (jobs do)."""
    parameters = dict(network.named_parameters())
    if any(not parameter.requires_grad for parameter in parameters.values()):
        parameters = {name: parameter for name, parameter in parameters.items() if not parameter.requires_grad}
    return weights_hash(parameters)


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read all tensors of a safetensors file onto the CPU.

    Raises:
        ModelError: the file is missing, truncated or not a safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"Weights file {path} does not exist: check the model folder or save the model again.")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ModelError(
            f"Weights file {path} is not a readable safetensors file ({error}); it is probably truncated or "
            "corrupted: copy or download it again."
        ) from error


def write_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write tensors to a safetensors file atomically (contiguous CPU copies, shared storage split)."""
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    tensors = {name: tensor.detach().cpu().clone().contiguous() for name, tensor in state_dict.items()}
    with atomic_output(path) as temp_path:
        save_file(tensors, temp_path)
    return Path(path)


def torch_load_weights(path: str | os.PathLike) -> object:
    """Load a PyTorch checkpoint with ``weights_only=True`` (tensors, dicts, lists, numbers only).

    Raises:
        ModelError: the file is missing or corrupted, or it needs arbitrary Python objects to unpickle
            (which MedGen never does for files it did not write), or it is a TorchScript archive.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"Checkpoint {path} does not exist.")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ModelError(
            f"Checkpoint {path} holds Python objects besides tensors, so it is not loaded (unpickling could run "
            f"arbitrary code). Found: {str(error).splitlines()[0]}. Re-save only the state dict "
            "(torch.save(model.state_dict(), ...)) or convert it to safetensors in an environment you trust."
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as error:
        raise ModelError(
            f"Checkpoint {path} could not be read as a PyTorch weights file ({error}); it is probably truncated, "
            "corrupted or a TorchScript archive (.ts): export the state dict instead."
        ) from error


#: wrappers a training checkpoint may put its state dict in, tried in this order
STATE_DICT_WRAPPERS = ("state_dict", "net", "model", "network")


def unwrap_state_dict(checkpoint: object) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a checkpoint: a raw state dict or one under a wrapper key (optimizer etc. ignored).

    Returns:
        ``(state_dict, container)`` where container is the wrapper key used, or ``"raw"``.

    Raises:
        ModelError: the checkpoint is not a mapping of names to tensors.
    """
    container = "raw"
    if isinstance(checkpoint, Mapping):
        for wrapper in STATE_DICT_WRAPPERS:
            if isinstance(checkpoint.get(wrapper), Mapping):
                checkpoint, container = checkpoint[wrapper], wrapper
                break
    if not isinstance(checkpoint, Mapping):
        raise ModelError(f"Checkpoint holds a {type(checkpoint).__name__}, not a state dict (names -> tensors).")
    tensors = {name: value for name, value in checkpoint.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ModelError(
            f"Checkpoint has no tensors (top-level keys: {sorted(map(str, checkpoint))[:8]}); expected a state dict, "
            f"possibly under one of {STATE_DICT_WRAPPERS}."
        )
    return tensors, container


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_KEYS_SHOWN])
    return shown + (f" and {len(names) - _KEYS_SHOWN} more" if len(names) > _KEYS_SHOWN else "")


def state_dict_differences(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """Missing keys, unexpected keys and shape mismatches (``"key: file [..] vs model [..]"``), sorted."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{name}: file {list(state_dict[name].shape)} vs model {list(expected[name].shape)}"
        for name in set(expected) & set(state_dict)
        if tuple(state_dict[name].shape) != tuple(expected[name].shape)
    )
    return missing, unexpected, mismatched


def load_state_dict_checked(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "the given state dict", strict: bool = True
) -> None:
    """Copy ``state_dict`` into ``model`` after checking names and shapes, with an error that lists them.

    Args:
        model: the network to fill (modified in place).
        state_dict: name -> tensor, as in ``model.state_dict()``.
        source: what the tensors came from, for the error message (a file path, a bundle name).
        strict: when False, missing and unexpected keys are allowed; shape mismatches never are.

    Raises:
        ModelError: listing the first missing, unexpected and shape-mismatched keys.
    """
    missing, unexpected, mismatched = state_dict_differences(model, state_dict)
    problems = [f"shape mismatches ({len(mismatched)}): {_listed(mismatched)}"] if mismatched else []
    if strict:
        problems += [f"missing keys ({len(missing)}): {_listed(missing)}"] if missing else []
        problems += [f"unexpected keys ({len(unexpected)}): {_listed(unexpected)}"] if unexpected else []
    if problems:
        raise ModelError(
            f"Weights from {source} do not fit the network {type(model).__name__}: " + "; ".join(problems) + ". "
            "Check that the model spec (network class and arguments) matches the checkpoint it was saved with."
        )
    model.load_state_dict(dict(state_dict), strict=strict)


def load_weights_into(network: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Fill ``network`` from a safetensors file with exactly its keys and shapes; returns ``network``.

    Raises:
        ModelError: the file is missing or corrupted, or its tensors do not fit the network (listed).
    """
    load_state_dict_checked(network, read_safetensors(path), source=str(path))
    return network
