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

from medgen.errors import BadInputError, MedGenError, ModelError
from medgen.io.atomic import write_text_atomic

MODEL_JSON = "medgen_model.json"
#: what a staged training run in a model folder is trained from (see :func:`check_same_run`)
RUN_JSON = "training_run.json"
FORMAT_VERSION = 1

Config = TypeVar("Config")


def write_model_json(folder: str | os.PathLike, task: str, **fields: Any) -> Path:
    """Write ``medgen_model.json`` for ``task`` with the given JSON-serialisable fields."""
    document = {"format_version": FORMAT_VERSION, "task": task, **fields}
    return write_text_atomic(Path(folder) / MODEL_JSON, json.dumps(document, indent=2) + "\n")


def read_model_json(folder: str | os.PathLike, task: str, required: dict[str, type | tuple[type, ...]] | None = None
                    ) -> dict[str, Any]:
    """Read ``medgen_model.json``; :class:`ModelError` if missing, unreadable, of another task, or lacking one of the
    ``required`` fields (name -> JSON type, e.g. ``{"labels": list}``) or holding it with another type."""
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
    for name, kind in (required or {}).items():
        value, kinds = document.get(name), kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):  # JSON true is no integer
            raise ModelError(f"{path}: its field {name!r} is missing or not a JSON {_json_type_name(kinds)} "
                             f"(got {value!r:.60}). Re-run the training job that wrote it.")
    return document


def _json_type_name(kinds: tuple[type, ...]) -> str:
    names = {list: "list", dict: "object", str: "string", int: "integer", float: "number"}
    return " or ".join(names.get(item, item.__name__) for item in kinds)


def _same_json_type(value: Any, default: Any) -> bool:
    """Whether a JSON value could stand for ``default``: numbers for numbers (a float field takes an integer),
    booleans, strings, and lists for tuples with items like the default's first (any list when it is empty)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and (isinstance(default, float) or isinstance(value, int))
    if isinstance(default, (tuple, list)):
        return isinstance(value, list) and (not default or all(_same_json_type(item, default[0]) for item in value))
    return isinstance(value, type(default))


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
    for field in dataclasses.fields(config_class):
        default = field.default if field.default is not dataclasses.MISSING else None
        if field.name in settings and default is not None and not _same_json_type(settings[field.name], default):
            raise refuse(f"The {what} setting {field.name!r} is {settings[field.name]!r:.60}, not of the type of its "
                         f"default {default!r}.")
    try:
        return config_class(**{key: tuple(value) if isinstance(value, list) else value for key, value in settings.items()})
    except (TypeError, ValueError, MedGenError) as error:
        raise refuse(f"The {what} settings cannot be used ({error}).") from None


def check_same_run(
    folder: str | os.PathLike, settings: dict[str, Any], data_hash: str, may_change: tuple[str, ...] = (),
    added_later: dict[str, Any] | None = None,
) -> None:
    """Record what a staged training in ``folder`` is trained from on its first start; refuse to continue it
    with other settings or data.

    A staged training keeps every finished stage (VAE, latents, ...) and builds the next on it, so a run
    started again with other settings or data would mix two models in one folder.

    Args:
        settings: JSON-serialisable settings (the config's fields, label names, prompts, ...).
        data_hash: a fingerprint of the training data (e.g. :func:`medgen.models.weights.weights_hash` of them).
        may_change: settings that continue a run rather than start another (the last stage's step count, to
            train it longer; checkpoint spacing); they apply to the stages still to train.
        added_later: settings that records of earlier MedGen versions lack, with the value those versions used
            (e.g. ``{"seed": 0}``), so that their runs can still be continued.

    Raises:
        BadInputError: naming each setting that differs (recorded -> now) and whether the data differ.
    """
    path = Path(folder) / RUN_JSON
    current = {"settings": json.loads(json.dumps(settings)), "data": data_hash}
    if not path.is_file():
        try:  # of two runs started at once on a new folder, one records its start; the other is compared with it
            write_text_atomic(path, json.dumps(current, indent=2, sort_keys=True) + "\n", exclusive=True)
            return
        except FileExistsError:
            pass
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
        before = {**(added_later or {}), **recorded["settings"]}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BadInputError(f"{path} cannot be read ({error}); use a new output folder.") from None
    now = current["settings"]
    problems = [f"{key} {before.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(before) | set(now))
                if before.get(key) != now.get(key) and key not in may_change]
    if recorded.get("data") != data_hash:
        problems.append("other training data")
    if problems:
        raise BadInputError(
            f"{folder} holds a training run started with other settings or data ({'; '.join(problems)}); continuing it "
            "would mix its finished stages with this run's. Use a new output folder, or delete this one to start afresh."
        )
