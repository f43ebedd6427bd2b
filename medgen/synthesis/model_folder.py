"""A trained MedGen generative model on disk: ``medgen_model.json`` + safetensors weights.

The JSON names the task (so a folder of another task is refused with a clear message), the
architecture settings, the label names and the voxel grid of what the model generates.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medgen.errors import ModelError
from medgen.io.atomic import atomic_output, write_text_atomic

MODEL_JSON = "medgen_model.json"
FORMAT_VERSION = 1


def write_model_json(folder: str | os.PathLike, task: str, **fields: Any) -> Path:
    """Write ``medgen_model.json`` for ``task`` with the given JSON-serialisable fields."""
    document = {"format_version": FORMAT_VERSION, "task": task, **fields}
    return write_text_atomic(Path(folder) / MODEL_JSON, json.dumps(document, indent=2) + "\n")


def read_model_json(folder: str | os.PathLike, task: str) -> dict[str, Any]:
    """Read ``medgen_model.json``; :class:`ModelError` if missing, unreadable or of another task."""
    path = Path(folder) / MODEL_JSON
    if not path.is_file():
        raise ModelError(f"{folder} is not a MedGen model folder: it has no {MODEL_JSON}.")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelError(f"{path} cannot be read ({error}).") from None
    if document.get("task") != task:
        raise ModelError(
            f"{folder} holds a model for task {document.get('task')!r}, but a {task!r} model is needed. "
            "Pick the folder written by the matching training job."
        )
    return document


def check_known_settings(config_class: type, document: dict[str, Any], what: str) -> None:
    """:class:`ModelError` naming the keys of ``document`` that are not fields of the dataclass ``config_class``
    (a model folder written by another MedGen version); ``what`` names the settings in the message."""
    fields = {field.name for field in dataclasses.fields(config_class)}
    unknown = set(document) - fields
    if unknown:
        raise ModelError(f"Unknown {what} settings {sorted(unknown)}; this MedGen version knows {sorted(fields)}.")


def save_weights(state: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Save a state dict as safetensors atomically (tensors made contiguous, on CPU)."""
    with atomic_output(path) as tmp:
        save_file({key: value.detach().cpu().contiguous() for key, value in state.items()}, str(tmp))
    return Path(path)


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load safetensors weights; :class:`ModelError` for a missing or corrupted file."""
    try:
        return load_file(str(path))
    except (OSError, RuntimeError, ValueError, SafetensorError) as error:
        raise ModelError(f"Weights file {path} is missing or corrupted ({error}). Re-run the training job.") from None


def load_into(network: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Load safetensors weights into ``network``, with a clear error listing the first mismatches."""
    result = network.load_state_dict(load_weights(path), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelError(
            f"{path} does not fit {type(network).__name__}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}."
        )
    return network
