"""Worker handlers of the translation job kinds ``translate-train`` and ``translate``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from medgen.errors import OutOfMemoryError, is_out_of_memory
from medgen.io import load_volume, save_volume
from medgen.jobs.context import JobContext
from medgen.translate.model import TranslationConfig, train_translation, translate_volume

TRAINING_OVERRIDES = ("steps", "batch_size", "lr", "conditioned", "mode", "lmi_compat", "voxel_axes", "memory_budget_mb")


def run_translate_train(ctx: JobContext) -> dict:
    """Train an LMI translation model (or, ``conditioned: false``, an SDEdit baseline) on target-modality volumes."""
    volumes = [load_volume(path, name=Path(path).name) for path in ctx.inputs["volumes"]]
    overrides = {name: ctx.params[name] for name in TRAINING_OVERRIDES if name in ctx.params}
    overrides["grid"] = tuple(ctx.params["grid"])
    config = TranslationConfig.tiny(**overrides) if ctx.params["preset"] == "tiny" else dataclasses.replace(TranslationConfig(), **overrides)
    model_dir = train_translation(volumes, ctx.output_path("model"), config, device=ctx.device, reporter=ctx.reporter,
                                  target_modality=ctx.params.get("target_modality"), seed=ctx.spec.seed)
    return {"outputs": {"model": str(model_dir)}}


def run_translate(ctx: JobContext) -> dict:
    """Translate the source volume; the output keeps the source's voxel grid."""
    source = load_volume(ctx.inputs["source"], name=f"source volume {Path(ctx.inputs['source']).name}")
    params = ctx.params
    try:
        translated = translate_volume(
            source, ctx.inputs["model"], sampler=params["sampler"], steps=params["steps"],
            sdedit_start=params.get("sdedit_start"), eta=params.get("eta", 1.0), seed=ctx.spec.seed, device=ctx.device, reporter=ctx.reporter,
            memory_budget_mb=params.get("memory_budget_mb"),
        )
    except (RuntimeError, MemoryError) as error:
        if not is_out_of_memory(error):
            raise
        budget = params.get("memory_budget_mb")
        raise OutOfMemoryError(
            f"Out of {ctx.device} memory translating a {tuple(source.shape[1:])} volume. Lower the LMI memory budget "
            f"(memory_budget_mb, now {f'{budget:g} MB' if budget else 'the model default'}; e.g. 256)"
            f"{', or translate on the CPU' if ctx.device.type == 'cuda' else ''}."
        ) from error
    output = save_volume(translated, ctx.output_path("translated.nii.gz"))
    return {"outputs": {"translated": str(output)}}
