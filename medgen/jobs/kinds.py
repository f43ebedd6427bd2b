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
    """

    name: str
    handler: str
    summary: str
    inputs: dict[str, Any]
    params: dict[str, Any]
    uses_hf_transformers: bool = False

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


register(
    JobKind(
        name="selftest",
        handler="medgen.jobs.selftest:run_selftest",
        summary="Smooth a volume step by step on the chosen device (checks the whole job path).",
        inputs={
            "type": "object",
            "properties": {"image": path_input("volume file to smooth")},
            "required": ["image"],
            "additionalProperties": False,
        },
        params={
            "type": "object",
            "properties": {
                "steps": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 5},
                "step_delay_s": {"type": "number", "minimum": 0, "maximum": 60, "default": 0.0},
            },
            "additionalProperties": False,
        },
    )
)


_PATH_LIST = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}

register(
    JobKind(
        name="synth-train",
        handler="medgen.synthesis.jobs:run_synth_train",
        summary="Train a joint image+label latent diffusion model (VAE, latents, LDM; resumable by stage).",
        inputs={
            "type": "object",
            "properties": {
                "folder": path_input("nnU-Net raw folder or folder of {case}_0000.nii.gz + {case}.nii.gz"),
                "images": _PATH_LIST,
                "labels": _PATH_LIST,
                "label_names": path_input("labels.json naming the label values"),
            },
            "oneOf": [{"required": ["folder"]}, {"required": ["images", "labels"]}],
            "additionalProperties": False,
        },
        params={
            "type": "object",
            "properties": {
                "shape": {"type": "array", "items": {"type": "integer", "minimum": 8}, "minItems": 3, "maxItems": 3, "default": [32, 32, 32]},
                "spacing_mm": {"type": ["array", "null"], "items": {"type": "number", "exclusiveMinimum": 0}, "minItems": 3, "maxItems": 3, "default": None},
                "preset": {"enum": ["tiny", "diff3"], "default": "tiny"},
                "vae_phase1_steps": {"type": "integer", "minimum": 0},
                "vae_phase2_steps": {"type": "integer", "minimum": 0},
                "ldm_steps": {"type": "integer", "minimum": 0},
                "batch_size": {"type": "integer", "minimum": 1},
                "grad_accum_steps": {"type": "integer", "minimum": 1},
                "checkpoint_every": {"type": "integer", "minimum": 1},
                "amp": {"type": "boolean"},
            },
            "additionalProperties": False,
        },
    )
)

register(
    JobKind(
        name="synthesize",
        handler="medgen.synthesis.jobs:run_synthesize",
        summary="Generate N aligned image+label pairs from a joint model; optionally export an nnU-Net dataset.",
        inputs={
            "type": "object",
            "properties": {"model": path_input("model folder written by synth-train")},
            "required": ["model"],
            "additionalProperties": False,
        },
        params={
            "type": "object",
            "properties": {
                "count": {"type": "integer", "minimum": 0, "maximum": 100000, "default": 4},
                "batch_size": {"type": "integer", "minimum": 1, "maximum": 64, "default": 1},
                "steps": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                "nnunet_dataset_id": {"type": ["integer", "null"], "minimum": 1, "maximum": 999, "default": None},
                "nnunet_name": {"type": "string", "pattern": "^[A-Za-z0-9_-]+$", "default": "MedGenSynthetic"},
                "channel_name": {"type": "string", "default": "MRI"},
            },
            "additionalProperties": False,
        },
    )
)


_MODEL_PARAM = {"type": "string", "default": "deepbet", "description": "'deepbet' or use the model_folder input"}
_SEGMENTATION_MODEL_INPUT = path_input("MedGen segmentation model folder (model.json + safetensors)")

register(
    JobKind(
        name="finetune",
        handler="medgen.adapt.jobs:run_finetune",
        summary="Few-shot fine-tuning of a segmentation network with a PEFT method (TenVOO, LoRA, ...); writes an adapter.",
        uses_hf_transformers=True,
        inputs={
            "type": "object",
            "properties": {
                "images": _PATH_LIST, "labels": _PATH_LIST,
                "val_image": path_input("held-out image for early stopping"),
                "val_label": path_input("its segmentation"),
                "model_folder": _SEGMENTATION_MODEL_INPUT,
            },
            "required": ["images", "labels"],
            "dependentRequired": {"val_image": ["val_label"], "val_label": ["val_image"]},
            "additionalProperties": False,
        },
        params={
            "type": "object",
            "properties": {
                "model": _MODEL_PARAM,
                "method": {"enum": ["tenvoo-l", "tenvoo-q", "lora", "ia3", "bitfit", "affine-norm", "adaptformer",
                                    "linear-probe", "spatial-adapter", "full"], "default": "tenvoo-l"},
                "method_options": {"type": "object", "default": {}},
                "steps": {"type": "integer", "minimum": 1, "default": 60},
                "lr": {"type": "number", "exclusiveMinimum": 0, "default": 1e-3},
                "batch_size": {"type": "integer", "minimum": 1, "default": 1},
                "val_every": {"type": "integer", "minimum": 1, "default": 20},
                "patience": {"type": "integer", "minimum": 1, "default": 5},
                "foreground_ratio": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.5},
            },
            "additionalProperties": False,
        },
    )
)

register(
    JobKind(
        name="infer",
        handler="medgen.adapt.jobs:run_infer",
        summary="Segment a volume with a base or adapted segmentation network.",
        uses_hf_transformers=True,
        inputs={
            "type": "object",
            "properties": {"image": path_input("volume to segment"), "adapter": path_input("adapter folder from finetune"),
                           "model_folder": _SEGMENTATION_MODEL_INPUT},
            "required": ["image"],
            "additionalProperties": False,
        },
        params={"type": "object", "properties": {"model": _MODEL_PARAM}, "additionalProperties": False},
    )
)

register(
    JobKind(
        name="evaluate",
        handler="medgen.adapt.jobs:run_evaluate",
        summary="Dice per segment of base vs adapted model on a held-out volume with a reference segmentation.",
        uses_hf_transformers=True,
        inputs={
            "type": "object",
            "properties": {"image": path_input("held-out volume"), "reference": path_input("its reference segmentation"),
                           "adapter": path_input("adapter folder from finetune"), "model_folder": _SEGMENTATION_MODEL_INPUT},
            "required": ["image", "reference"],
            "additionalProperties": False,
        },
        params={"type": "object", "properties": {"model": _MODEL_PARAM}, "additionalProperties": False},
    )
)
