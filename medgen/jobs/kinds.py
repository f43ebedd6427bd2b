"""Registry of job kinds: what inputs and parameters each takes and which function runs it.

Handlers are named as ``"module:function"`` strings and imported only when a job of that kind runs,
so starting the worker (and validating a job) stays fast.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

from medgen.errors import BadInputError


@dataclasses.dataclass(frozen=True)
class JobKind:
    """One kind of job.

    Args:
        name: the ``kind`` string in ``job.json``.
        handler: ``"package.module:function"``; the function takes a :class:`medgen.jobs.context.JobContext`
            and returns ``{"outputs": {name: path}, ...}``.
        summary: one line for ``medgen --help`` and error messages.
        inputs: JSON schema of the ``inputs`` object (names -> file paths or lists of paths).
        params: JSON schema of the ``params`` object (defaults are filled in by validation).
        uses_hf_transformers: the handler needs Hugging Face ``transformers`` (HF peft baselines);
            other kinds start faster because the worker keeps MONAI from importing it.
        resumes: a re-run of the job folder continues the earlier run from what it left under ``outputs/``
            (training kinds: checkpoints, finished stages). Otherwise the worker sets the earlier outputs
            aside first (:func:`medgen.jobs.context.set_aside_outputs`).
    """

    name: str
    handler: str
    summary: str
    inputs: dict[str, Any]
    params: dict[str, Any]
    uses_hf_transformers: bool = False
    resumes: bool = False

    def load_handler(self) -> Callable:
        module_name, function_name = self.handler.split(":")
        return getattr(importlib.import_module(module_name), function_name)


_KINDS: dict[str, JobKind] = {}


def register(kind: JobKind) -> JobKind:
    """Add a job kind (re-registering a name replaces it)."""
    _KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> JobKind:
    """The registered kind called ``name``; :class:`BadInputError` listing the known kinds otherwise."""
    if name not in _KINDS:
        raise BadInputError(f"Unknown job kind {name!r}. Known kinds: {', '.join(sorted(_KINDS))}.")
    return _KINDS[name]


def known_kinds() -> list[JobKind]:
    return [_KINDS[name] for name in sorted(_KINDS)]


def path_input(description: str) -> dict[str, Any]:
    """JSON schema of one input file path."""
    return {"type": "string", "minLength": 1, "description": description}


#: JSON schema of a non-empty list of input file paths
PATH_LIST: dict[str, Any] = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}


def object_schema(properties: dict[str, Any], required: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    """JSON schema of an ``inputs``/``params`` object that allows exactly ``properties``."""
    schema = {"type": "object", "properties": properties, "additionalProperties": False, **extra}
    if required:
        schema["required"] = list(required)
    return schema


register(
    JobKind(
        name="selftest",
        handler="medgen.jobs.selftest:run_selftest",
        summary="Smooth a volume step by step on the chosen device (checks the whole job path).",
        inputs=object_schema({"image": path_input("volume file to smooth")}, required=("image",)),
        params=object_schema({
            "steps": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 5},
            "step_delay_s": {"type": "number", "minimum": 0, "maximum": 60, "default": 0.0},
        }),
    )
)



# The capabilities register their job kinds (schemas only: handlers are imported when a job runs).
import medgen.adapt.job_kinds  # noqa: E402,F401
import medgen.synthesis.job_kinds  # noqa: E402,F401
import medgen.translate.job_kinds  # noqa: E402,F401
