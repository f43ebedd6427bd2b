"""Job kinds of adaptation: ``finetune``, ``infer`` and ``evaluate`` (schemas; handlers in :mod:`medgen.adapt.jobs`)."""

from medgen.jobs.kinds import PATH_LIST, JobKind, path_input, register


_MODEL_PARAM = {"type": "string", "default": "deepbet", "description": "'deepbet' or use the model_folder input"}
_SEGMENTATION_MODEL_INPUT = path_input("MedGen segmentation model folder (model.json + safetensors)")

register(
    JobKind(
        name="finetune",
        resumes=True,
        handler="medgen.adapt.jobs:run_finetune",
        summary="Few-shot fine-tuning of a segmentation network with a PEFT method (TenVOO, LoRA, ...); writes an adapter.",
        uses_hf_transformers=True,
        inputs={
            "type": "object",
            "properties": {
                "images": PATH_LIST, "labels": PATH_LIST,
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
        summary="Dice per segment of base vs adapted model on a held-out pair, and/or FID of generated vs real volumes.",
        uses_hf_transformers=True,
        inputs={
            "type": "object",
            "properties": {"image": path_input("held-out volume"), "reference": path_input("its reference segmentation"),
                           "adapter": path_input("adapter folder from finetune"), "model_folder": path_input(
                               "MedGen model folder (segmentation model, or the generator whose encoder gives FID features)"),
                           "real": PATH_LIST, "generated": PATH_LIST,
                           "feature_model_folder": path_input("MedGen model folder of the FID feature network "
                                                              "(default: the base model's own encoder)")},
            "anyOf": [{"required": ["image"]}, {"required": ["real"]}],
            "dependentRequired": {"image": ["reference"], "reference": ["image"], "real": ["generated"],
                                  "generated": ["real"], "feature_model_folder": ["real"]},
            "additionalProperties": False,
        },
        params={"type": "object", "properties": {
            "model": _MODEL_PARAM,
            "feature_layer": {"type": "string", "minLength": 1,
                              "description": "FID feature layer (dotted module name); default: the bottleneck convolution"},
        }, "additionalProperties": False},
    )
)

_GENERATOR_SHAPE = {"type": "array", "items": {"type": "integer", "minimum": 4}, "minItems": 3, "maxItems": 3, "default": [32, 32, 32]}

register(
    JobKind(
        name="finetune-generator",
        resumes=True,
        handler="medgen.adapt.jobs:run_finetune_generator",
        summary="Fine-tune a pretrained 3D DDPM generator on a few volumes with a PEFT method (schedule from its spec).",
        uses_hf_transformers=True,
        inputs={
            "type": "object",
            "properties": {"volumes": PATH_LIST, "model_folder": path_input("MedGen model folder of a DiffusionModelUNet")},
            "required": ["volumes", "model_folder"],
            "additionalProperties": False,
        },
        params={
            "type": "object",
            "properties": {
                "method": {"enum": ["tenvoo-l", "tenvoo-q", "lora", "ia3", "bitfit", "affine-norm", "full"], "default": "tenvoo-l"},
                "method_options": {"type": "object", "default": {}},
                "shape": _GENERATOR_SHAPE,
                "steps": {"type": "integer", "minimum": 1, "default": 200},
                "lr": {"type": "number", "exclusiveMinimum": 0, "default": 1e-4},
                "batch_size": {"type": "integer", "minimum": 1, "default": 1},
            },
            "additionalProperties": False,
        },
    )
)

register(
    JobKind(
        name="sample-generator",
        handler="medgen.adapt.jobs:run_sample_generator",
        summary="Sample N volumes from a base or adapted 3D DDPM generator (DDPM, schedule from its spec).",
        uses_hf_transformers=True,
        inputs={
            "type": "object",
            "properties": {"model_folder": path_input("MedGen model folder of a DiffusionModelUNet"),
                           "adapter": path_input("adapter folder from finetune-generator"),
                           "reference": path_input("volume whose (resized) grid the samples take")},
            "required": ["model_folder"],
            "additionalProperties": False,
        },
        params={
            "type": "object",
            "properties": {"count": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 2}, "shape": _GENERATOR_SHAPE},
            "additionalProperties": False,
        },
    )
)
