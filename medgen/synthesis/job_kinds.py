"""Job kinds of paired synthesis: ``synth-train`` and ``synthesize`` (schemas; handlers in :mod:`medgen.synthesis.jobs`)."""

from medgen.jobs.kinds import PATH_LIST, JobKind, path_input, register


register(
    JobKind(
        name="synth-train",
        handler="medgen.synthesis.jobs:run_synth_train",
        summary="Train a joint image+label latent diffusion model (VAE, latents, LDM; resumable by stage).",
        inputs={
            "type": "object",
            "properties": {
                "folder": path_input("nnU-Net raw folder or folder of {case}_0000.nii.gz + {case}.nii.gz"),
                "images": PATH_LIST,
                "labels": PATH_LIST,
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
