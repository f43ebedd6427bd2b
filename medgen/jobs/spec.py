"""``job.json``: its schema, loading and validation (before any work starts)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jsonschema

from medgen.errors import BadInputError
from medgen.jobs.kinds import get_kind

JOB_FILE = "job.json"
SCHEMA_VERSION = 1

JOB_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "MedGen job",
    "type": "object",
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "kind": {"type": "string", "minLength": 1},
        "inputs": {"type": "object"},
        "params": {"type": "object"},
        "device": {"type": "string", "pattern": r"^(auto|cpu|cuda(:\d+)?)\Z"},
        "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
    },
    "required": ["schema_version", "kind", "inputs"],
    "additionalProperties": False,
}


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """A validated job: paths in ``inputs`` are absolute, ``params`` has its defaults filled in."""

    kind: str
    inputs: dict[str, Any]
    params: dict[str, Any]
    device: str = "auto"
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, **dataclasses.asdict(self)}


def _is_whole_number(checker, instance) -> bool:
    """JSON Schema counts 2.0 as an integer; Python code given 2.0 where it needs an int fails, so MedGen does not."""
    return isinstance(instance, int) and not isinstance(instance, bool)


_DRAFT = jsonschema.validators.validator_for(JOB_SCHEMA)
#: the job schemas' validator: JSON Schema 2020-12 with integers that are Python ints
Validator = jsonschema.validators.extend(_DRAFT, type_checker=_DRAFT.TYPE_CHECKER.redefine("integer", _is_whole_number))


def _schema_error(error: jsonschema.ValidationError, where: str, kind: str = "") -> BadInputError:
    """The refusal a user can act on: which parameter or input (as the panels and the CLI name it), what is
    wrong with it, and where that is in job.json."""
    parts = [str(part) for part in error.absolute_path]
    if where == "top level":
        return BadInputError(f"job.json is invalid at '{'/'.join(parts) or where}': {error.message}.")
    location = "/".join([where, *parts])
    noun = {"params": "parameter", "inputs": "input"}[where]
    subject = f"{noun.capitalize()} '{parts[0]}' of the {kind} job" if parts else f"The {kind} job's {noun}s"
    return BadInputError(f"{subject}: {error.message} (job.json '{location}').")


def _fill_defaults(params: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    filled = dict(params)
    for name, prop in schema.get("properties", {}).items():
        if name not in filled and "default" in prop:
            filled[name] = prop["default"]
    return filled


def _resolve_paths(value: Any, base: Path, name: str) -> Any:
    if isinstance(value, list):
        return [_resolve_paths(item, base, name) for item in value]
    path = Path(value)
    path = path if path.is_absolute() else (base / path)
    try:
        exists = path.exists()
    except OSError as error:  # e.g. a file name longer than the file system allows
        raise BadInputError(f"Input '{name}' is not a usable path ({error}).") from None
    if not exists:
        raise BadInputError(f"Input '{name}' points to {path}, which does not exist.")
    return str(path.resolve())


def _check_finite_numbers(value: Any, kind: str, path: str = "") -> None:
    """Refuse NaN and infinite numbers anywhere in a job's parameters: JSON-schema bounds never compare false for
    NaN, so e.g. NaN filter thresholds would accept every candidate and an infinite learning rate ruin the weights."""
    if isinstance(value, float) and not math.isfinite(value):
        name = path.split("/")[0]
        raise BadInputError(f"Parameter '{name}' of the {kind} job: {value} is not a finite number (job.json 'params/{path}').")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        _check_finite_numbers(item, kind, f"{path}/{key}" if path else str(key))


def validate_job(document: Any, base_dir: Path) -> JobSpec:
    """Check a parsed ``job.json`` document and return the :class:`JobSpec`.

    Relative input paths are resolved against ``base_dir`` and must exist.
    """
    try:
        Validator(JOB_SCHEMA).validate(document)
    except jsonschema.ValidationError as error:
        raise _schema_error(error, "top level") from None
    kind = get_kind(document["kind"])
    inputs, params = document["inputs"], document.get("params", {})
    for section, schema, value in (("inputs", kind.inputs, inputs), ("params", kind.params, params)):
        try:
            Validator(schema).validate(value)
        except jsonschema.ValidationError as error:
            raise _schema_error(error, section, kind.name) from None
    _check_finite_numbers(params, kind.name)
    return JobSpec(
        kind=kind.name,
        inputs={name: _resolve_paths(value, base_dir, name) for name, value in inputs.items()},
        params=_fill_defaults(params, kind.params),
        device=document.get("device", "auto"),
        seed=document.get("seed", 0),
    )


def load_job(job_dir: str | Path) -> JobSpec:
    """Read and validate ``JOB_DIR/job.json``; :class:`BadInputError` with a clear message otherwise."""
    job_dir = Path(job_dir)
    job_file = job_dir / JOB_FILE
    if not job_file.is_file():
        raise BadInputError(f"No {JOB_FILE} in {job_dir}: a job folder must contain one.")
    try:
        document = json.loads(job_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadInputError(f"{job_file} is not valid JSON ({error}).") from None
    return validate_job(document, job_dir)
