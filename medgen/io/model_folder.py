"""A trained MedGen generative model on disk: ``medgen_model.json`` next to its safetensors weights.

The JSON names the task (so a folder of another task is refused with a clear message), the
architecture settings under ``config``, the label names and the voxel grid of what the model
generates. Only JSON here (no torch), so the Slicer panels can read a model folder cheaply; the
weights are read with :func:`medgen.models.weights.load_weights_into`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, TypeVar

from medgen.errors import MedGenError, ModelError
from medgen.io.atomic import write_text_atomic

MODEL_JSON = "medgen_model.json"
FORMAT_VERSION = 1

Config = TypeVar("Config")


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
    if not isinstance(document, dict) or document.get("task") != task:
        found = document.get("task") if isinstance(document, dict) else None
        raise ModelError(
            f"{folder} holds a model for task {found!r}, but a {task!r} model is needed. "
            "Pick the folder written by the matching training job."
        )
    return document


def model_config(folder: str | os.PathLike, document: dict[str, Any], config_class: type[Config], what: str) -> Config:
    """The architecture settings stored under ``config`` in a model folder's ``medgen_model.json``, rebuilt
    from their :func:`dataclasses.asdict` JSON (lists become tuples).

    Raises:
        ModelError: naming the folder's JSON file, when the settings are absent or not a JSON object, name
            settings this version does not know (a folder written by another MedGen version), lack required
            ones or hold values the dataclass refuses; ``what`` names the settings in the message.
    """
    def refuse(problem: str) -> ModelError:
        return ModelError(f"{Path(folder) / MODEL_JSON}: {problem} Re-run the training job that wrote it.")

    settings = document.get("config")
    if not isinstance(settings, dict):
        raise refuse(f"The {what} settings are missing or not a JSON object (got {type(settings).__name__}).")
    fields = {field.name for field in dataclasses.fields(config_class)}
    unknown = set(settings) - fields
    if unknown:
        raise refuse(f"Unknown {what} settings {sorted(unknown)}; this MedGen version knows {sorted(fields)}.")
    try:
        return config_class(**{key: tuple(value) if isinstance(value, list) else value for key, value in settings.items()})
    except (TypeError, ValueError, MedGenError) as error:
        raise refuse(f"The {what} settings cannot be used ({error}).") from None
