"""Job kinds of modality translation: ``translate-train`` and ``translate`` (schemas; handlers in :mod:`medgen.translate.jobs`)."""

from medgen.jobs.kinds import PATH_LIST, JobKind, object_schema, path_input, register

register(
    JobKind(
        name="translate-train",
        resumes=True,
        handler="medgen.translate.jobs:run_translate_train",
        summary="Train an LMI-conditioned DDPM on target-modality volumes only (zero-shot translation model).",
        inputs=object_schema({"volumes": PATH_LIST}, required=("volumes",)),
        params=object_schema({
            "preset": {"enum": ["tiny", "midiffusion"], "default": "tiny"},
            "mode": {"enum": ["2.5d", "3d"], "default": "2.5d"},
            "grid": {"type": "array", "items": {"type": "integer", "minimum": 8}, "minItems": 3, "maxItems": 3, "default": [32, 32, 32]},
            "conditioned": {"type": "boolean", "default": True},
            "steps": {"type": "integer", "minimum": 1},
            "batch_size": {"type": "integer", "minimum": 1},
            "lr": {"type": "number", "exclusiveMinimum": 0},
            "target_modality": {"type": ["string", "null"], "default": None,
                                "description": "modality of the training volumes (e.g. T1), recorded in the model"},
            "lmi_compat": {"type": "boolean", "default": False,
                           "description": "condition on the released LMI definition (to match models of the released code)"},
            "memory_budget_mb": {"type": "number", "exclusiveMinimum": 0,
                                 "description": "LMI chunk budget in MB for the conditioning maps (default: the "
                                                "preset's); lower it on out-of-memory, it may change when resuming"},
            "voxel_axes": {"enum": ["ras", "storage"],
                           "description": "axes the model sees volumes on: RAS-ordered (default), or each file's storage "
                                          "order, as models trained before MedGen recorded this did (to continue one)"},
        }),
    )
)

register(
    JobKind(
        name="translate",
        handler="medgen.translate.jobs:run_translate",
        summary="Translate a volume into the model's modality (LMI-guided DDPM/DDIM, or SDEdit with an unconditional model).",
        inputs=object_schema({"source": path_input("volume to translate"), "model": path_input("model folder from translate-train")},
                             required=("source", "model")),
        params=object_schema({
            "sampler": {"enum": ["ddpm", "ddim"], "default": "ddpm"},
            "steps": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100,
                      "description": "DDIM steps, a divisor of the model's 1000 timesteps (DDPM always runs all of them)"},
            "sdedit_start": {"type": ["integer", "null"], "minimum": 0, "maximum": 999, "default": None},
            "eta": {"type": "number", "minimum": 0, "maximum": 1, "default": 1.0,
                    "description": "DDIM stochasticity: 1 = fresh noise every step (robust), 0 = deterministic"},
            "memory_budget_mb": {"type": ["number", "null"], "exclusiveMinimum": 0, "default": None,
                                 "description": "LMI chunk budget in MB (null: the model's); lower it on GPU out-of-memory "
                                                "(below one plane's need, values change within 1e-6: see TranslationConfig)"},
        }),
    )
)
