"""Adapter files: ``adapter_model.safetensors`` (trainable tensors + TenVOO θ0) and ``adapter_config.json``.

Everything trainable is saved, including trained biases, norms and heads (the released TenVOO code lost them,
spec quirk Q3). The config names the base model by a SHA-256 of its frozen tensors, so an adapter is never
silently applied to other weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from medgen.errors import BadInputError, MedGenError, ModelError
from medgen.io.atomic import atomic_output, ensure_folder, write_text_atomic
from medgen.peft.inject import adapter_record, inject
from medgen.peft.report import trains_whole_model
from medgen.peft.tenvoo_layer import FrozenCores

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "medgen-peft-adapter"
FORMAT_VERSION = 1


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds, by name: every trainable parameter and the frozen TenVOO cores θ0;
    for full fine-tuning the whole state dict, since training in ``train()`` mode also moves its BatchNorm
    statistics (parameter-efficient methods train in ``eval()`` mode and leave every buffer as it was)."""
    if trains_whole_model(model):  # the one rule the training loops use to pick train() mode
        return dict(model.state_dict(keep_vars=True))
    state = {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}
    for module_name, module in model.named_modules():
        if isinstance(module, FrozenCores):
            state.update({f"{module_name}.{key}": buffer for key, buffer in module.as_dict().items()})
    return state


def base_weights_sha256(model: nn.Module, adapter_names: set[str]) -> str:
    """SHA-256 over name, dtype, shape and bytes of every state-dict tensor not stored in the adapter."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name in adapter_names:
            continue
        if tensor.device.type == "meta":
            raise BadInputError(f"cannot hash base weights on the meta device ({name}); materialise the model first.")
        cpu = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{cpu.dtype}|{tuple(cpu.shape)}".encode())
        digest.update(cpu.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write the adapter of ``model`` into directory ``path`` (created if needed).

    Args:
        model: a model adapted with :func:`medgen.peft.inject` (before :func:`merge`).
        path: output directory; gets ``adapter_config.json`` and ``adapter_model.safetensors``.

    Returns:
        The directory.
    """
    record = adapter_record(model)
    state = adapter_state(model)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **dataclasses.asdict(record),
        "base_weights_sha256": base_weights_sha256(model, set(state)),
        "tensor_names": sorted(state),
    }
    try:
        json.dumps(config)  # checked before any file is written
    except TypeError as error:
        raise BadInputError(f"adapter options must be JSON-serialisable to be saved: {error}.") from error
    directory = ensure_folder(path)
    tensors = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in state.items()}
    # each file appears whole or not at all; the config, written last, names the tensors it expects and the
    # digest of the file that holds them (safetensors has no checksum: damaged bytes would load as other numbers)
    with atomic_output(directory / WEIGHTS_FILE) as temporary:
        save_file(tensors, str(temporary), metadata={"format": FORMAT})
        config["adapter_weights_sha256"] = _file_sha256(temporary)
    write_text_atomic(directory / CONFIG_FILE, json.dumps(config, indent=2))
    return directory


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_adapter(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        tensors = load_file(str(directory / WEIGHTS_FILE))
    except (OSError, ValueError, SafetensorError) as error:
        raise ModelError(
            f"adapter directory {str(directory)!r} must hold a readable {CONFIG_FILE} and {WEIGHTS_FILE}: {error}. "
            "Train or save the adapter again (a finetune job or medgen.peft.save_adapter writes one)."
        ) from error
    if not isinstance(config, dict):
        raise ModelError(f"{directory / CONFIG_FILE} must hold a JSON object (a {FORMAT} config), found {type(config).__name__}.")
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise ModelError(
            f"{directory / CONFIG_FILE} is not a {FORMAT} v{FORMAT_VERSION} config "
            f"(found format={config.get('format')!r}, version={config.get('format_version')!r})."
        )
    recorded = config.get("adapter_weights_sha256")  # absent in adapters saved before it was recorded
    if recorded is not None and recorded != _file_sha256(directory / WEIGHTS_FILE):
        raise ModelError(f"{directory / WEIGHTS_FILE} is damaged: its contents no longer match the digest recorded when "
                         "it was saved. Train or save the adapter again.")
    return config, tensors


def load_adapter(base_model: nn.Module, path: str | Path) -> nn.Module:
    """Adapt a pristine ``base_model`` in place as recorded in ``path`` and load the adapter tensors.

    Args:
        base_model: the base network with the weights the adapter was trained on (not adapted yet).
        path: directory written by :func:`save_adapter`.

    Returns:
        ``base_model``, adapted. After a ``ModelError`` it may be partly adapted: discard it.

    Raises:
        ModelError: unreadable/corrupted files, an adapter that does not fit this network, or base weights whose
            hash differs from the ones the adapter was trained on.
    """
    directory = Path(path)
    config, tensors = _read_adapter(directory)
    try:
        model = inject(base_model, config["method"], preset=config["preset"], **config["options"])
    except (MedGenError, KeyError, TypeError) as error:
        raise ModelError(
            f"the adapter in {str(directory)!r} does not fit this {type(base_model).__name__}: {error}"
        ) from error
    expected = adapter_state(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ModelError(
            f"the adapter in {str(directory)!r} does not fit this model: missing tensors {missing[:5]}, "
            f"unexpected tensors {unexpected[:5]}."
        )
    wrong = [name for name, tensor in tensors.items()
             if tuple(tensor.shape) != tuple(expected[name].shape) or tensor.dtype != expected[name].dtype]
    if wrong:
        raise ModelError(f"adapter tensors {wrong[:5]} do not have the shapes and data types this model expects.")
    base_hash = base_weights_sha256(model, set(expected))
    if base_hash != config.get("base_weights_sha256"):
        raise ModelError(
            f"the adapter in {str(directory)!r} was trained on base weights with SHA-256 "
            f"{config.get('base_weights_sha256')}, but this model's weights hash to {base_hash}; "
            "load the base checkpoint the adapter was trained from."
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            expected[name].copy_(tensor)
    return model
