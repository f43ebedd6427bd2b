"""Job kinds of synthesis (schemas only): paired ``synth-train``/``synthesize`` (handlers in :mod:`medgen.synthesis.jobs`) and
mask-conditioned ``maskgen-train``/``maskgen`` (handlers in :mod:`medgen.synthesis.maskgen_jobs`)."""

from medgen.jobs.kinds import PATH_LIST, JobKind, path_input, register

#: the training grid of a synthesis model: shape (voxels) and optional resampling spacing
_GRID = {
    "shape": {"type": "array", "items": {"type": "integer", "minimum": 8}, "minItems": 3, "maxItems": 3, "default": [32, 32, 32]},
    "spacing_mm": {"type": ["array", "null"], "items": {"type": "number", "exclusiveMinimum": 0}, "minItems": 3, "maxItems": 3, "default": None},
}
#: optional nnU-Net export of generated pairs (the dataset name is per kind)
_NNUNET_EXPORT = {
    "nnunet_dataset_id": {"type": ["integer", "null"], "minimum": 1, "maximum": 999, "default": None},
    "channel_name": {"type": "string", "default": "MRI"},
}


register(
    JobKind(
        name="synth-train",
        resumes=True,
        handler="medgen.synthesis.jobs:run_synth_train",
        summary="Train a joint image+label latent diffusion model (VAE, latents, LDM; resumable by stage).",
        inputs={
            "type": "object",
            "properties": {
                "folder": path_input("nnU-Net raw folder or folder of {case}_0000.nii.gz + {case}.nii.gz"),
                "images": PATH_LIST,
                "labels": PATH_LIST,
                "label_names": path_input("labels.json naming the label values (default: the folder's nnU-Net dataset.json, if any)"),
            },
            "oneOf": [{"required": ["folder"]}, {"required": ["images", "labels"]}],
            "additionalProperties": False,
        },
        params={
            "type": "object",
            "properties": {
                **_GRID,
                "preset": {"enum": ["tiny", "diff3"], "default": "tiny"},
                "vae_phase1_steps": {"type": "integer", "minimum": 0},
                "vae_phase2_steps": {"type": "integer", "minimum": 0},
                "ldm_steps": {"type": "integer", "minimum": 0},
                "batch_size": {"type": "integer", "minimum": 1, "description": "VAE micro-batch"},
                "ldm_batch_size": {"type": "integer", "minimum": 1,
                                   "description": "latent DDPM micro-batch (capped at the number of cases)"},
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
                "steps": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100,
                          "description": "DDIM steps, a divisor of the model's 1000 timesteps (e.g. 50, 100, 250)"},
                **_NNUNET_EXPORT,
                "nnunet_name": {"type": "string", "pattern": "^[A-Za-z0-9_-]+\\Z", "default": "MedGenSynthetic"},
            },
            "additionalProperties": False,
        },
    )
)

_MODALITY = {"type": "string", "minLength": 1}
_FRACTION = {"type": "number", "minimum": 0, "maximum": 1}

register(
    JobKind(
        name="maskgen-train",
        resumes=True,
        handler="medgen.synthesis.maskgen_jobs:run_maskgen_train",
        summary="Train an MRGen-style mask-conditioned generator (VAE, prompt UNet, ControlNet, checker; resumable by stage).",
        inputs={
            "type": "object",
            "properties": {
                "source_images": PATH_LIST,
                "source_labels": PATH_LIST,
                "target_images": PATH_LIST,
                "label_names": path_input("labels.json naming the organ label values"),
            },
            "required": ["source_images", "source_labels", "target_images"],
            "additionalProperties": False,
        },
        params={
            "type": "object",
            "properties": {
                **_GRID,
                "preset": {"enum": ["tiny", "mrgen"], "default": "tiny"},
                "source_modality": _MODALITY,
                "target_modality": _MODALITY,
                "source_attributes": {"type": "string", "default": ""},
                "target_attributes": {"type": "string", "default": ""},
                "region": {"type": "string", "default": ""},
                "encoding": {"enum": ["one-hot", "merged"], "default": "one-hot"},
                "vae_steps": {"type": "integer", "minimum": 0},
                "unet_steps": {"type": "integer", "minimum": 0},
                "controlnet_steps": {"type": "integer", "minimum": 0},
                "train_checker": {"type": "boolean"},
                "checker_steps": {"type": "integer", "minimum": 0},
                "target_pseudo_labels": {"type": "boolean", "default": False,
                                         "description": "extension: the ControlNet also sees the target images with the checker's masks"},
                "controlnet_flip_axes": {"type": "array", "items": {"enum": [0, 1, 2]}, "uniqueItems": True, "default": [],
                                         "description": "extension: the ControlNet stage mirrors image + mask along these voxel axes at random"},
                "unet_flip_axes": {"type": "array", "items": {"enum": [0, 1, 2]}, "uniqueItems": True, "default": [],
                                   "description": "extension: the latent UNet stage mirrors the images along these voxel axes at random"},
                "batch_size": {"type": "integer", "minimum": 1},
                "grad_accum_steps": {"type": "integer", "minimum": 1},
                "checkpoint_every": {"type": "integer", "minimum": 1},
                "amp": {"type": "boolean"},
                "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1, "description": "seeds the training of every stage (default: the job's seed)"},
            },
            "required": ["source_modality", "target_modality"],
            "additionalProperties": False,
        },
    )
)

register(
    JobKind(
        name="maskgen",
        handler="medgen.synthesis.maskgen_jobs:run_maskgen",
        summary="Render target-modality images of label maps with a mask-conditioned model; keep the checker-accepted pairs.",
        inputs={
            "type": "object",
            "properties": {
                "model": path_input("model folder written by maskgen-train"),
                "masks": PATH_LIST,
                "checker": path_input("a maskgen-train checker/ folder or a MedGen segmentation model folder (default: the model's own checker/)"),
            },
            "required": ["model", "masks"],
            "additionalProperties": False,
        },
        params={
            "type": "object",
            "properties": {
                "target_modality": _MODALITY,
                "candidates": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 20},
                "chunk": {"type": "integer", "minimum": 1, "maximum": 64, "default": 10},
                "steps": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50},
                "guidance_scale": {"type": "number", "minimum": 0, "maximum": 50, "default": 7.0},
                "conditioning_scale": {"type": "number", "minimum": 0, "maximum": 10, "default": 1.0},
                "thresholds": {
                    "type": "object",
                    "properties": {
                        "avg_confidence": _FRACTION, "avg_iou": _FRACTION, "organ_iou": _FRACTION, "organ_confidence": _FRACTION,
                        "top_k": {"type": "integer", "minimum": 1},
                    },
                    "additionalProperties": False,
                    "default": {},
                },
                **_NNUNET_EXPORT,
                "nnunet_name": {"type": "string", "pattern": "^[A-Za-z0-9_-]+\\Z", "default": "MedGenMaskGen"},
            },
            "required": ["target_modality"],
            "additionalProperties": False,
        },
    )
)
