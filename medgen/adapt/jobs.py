"""Worker handlers of the adaptation job kinds: ``finetune``, ``infer`` and ``evaluate``."""

from __future__ import annotations

import json
from pathlib import Path

from medgen.adapt.finetune import FinetuneConfig, finetune_segmentation
from medgen.adapt.segmenter import load_segmentation_model, segment
from medgen.errors import BadInputError
from medgen.io import check_same_geometry, load_volume, save_volume
from medgen.io.atomic import write_text_atomic
from medgen.jobs.context import JobContext
from medgen.metrics import dice_per_class
from medgen.peft import describe, inject, load_adapter, save_adapter, trainable_parameters


def _model_source(ctx: JobContext) -> str:
    return ctx.inputs.get("model_folder") or ctx.params["model"]


def _pair(image_path: str, label_path: str, name: str):
    image = load_volume(image_path, name=f"{name} image {Path(image_path).name}")
    label = load_volume(label_path, label=True, name=f"{name} label {Path(label_path).name}")
    check_same_geometry(image, label, f"{name} image", f"{name} label")
    return image, label


def run_finetune(ctx: JobContext) -> dict:
    """Inject the chosen method, fine-tune on the training pairs, save the adapter (+ history)."""
    images, labels = ctx.inputs["images"], ctx.inputs["labels"]
    if len(images) != len(labels):
        raise BadInputError(f"Every training volume needs its segmentation: {len(images)} images, {len(labels)} label maps.")
    training = [_pair(image, label, f"training case {n}") for n, (image, label) in enumerate(zip(images, labels))]
    validation = _pair(ctx.inputs["val_image"], ctx.inputs["val_label"], "validation") if "val_image" in ctx.inputs else None
    model = load_segmentation_model(_model_source(ctx))
    inject(model.network, ctx.params["method"], **ctx.params["method_options"])
    ctx.reporter.log(f"{ctx.params['method']} on {model.name}: {trainable_parameters(model.network):,} trainable parameters")
    config = FinetuneConfig(**{key: ctx.params[key] for key in ("steps", "lr", "batch_size", "val_every", "patience", "foreground_ratio")}, seed=ctx.spec.seed)
    result = finetune_segmentation(
        model, training, config, checkpoint_dir=ctx.output_path("checkpoints"), validation=validation,
        device=ctx.device, reporter=ctx.reporter,
    )
    adapter_dir = save_adapter(model.network, ctx.output_path("adapter"))
    summary = {"model": model.name, "method": ctx.params["method"], "trainable_parameters": trainable_parameters(model.network),
               "steps": result.steps, "best_val_dice": result.best_val_dice, "history": result.history,
               "layers": describe(model.network).get("layers", [])}
    history = write_text_atomic(ctx.output_path("finetune_report.json"), json.dumps(summary, indent=2, default=str) + "\n")
    return {"outputs": {"adapter": str(adapter_dir), "report": str(history)}, "best_val_dice": result.best_val_dice}


def _model_with_optional_adapter(ctx: JobContext):
    model = load_segmentation_model(_model_source(ctx))
    if "adapter" in ctx.inputs:
        load_adapter(model.network, ctx.inputs["adapter"])
    return model


def run_infer(ctx: JobContext) -> dict:
    """Segment one volume with the base or adapted model; the label map keeps the input's geometry."""
    image = load_volume(ctx.inputs["image"], name="input image")
    model = _model_with_optional_adapter(ctx)
    ctx.reporter.progress("segmenting", 0, 1)
    labels = segment(model, image, ctx.device)
    ctx.reporter.progress("segmenting", 1, 1)
    output = save_volume(labels, ctx.output_path("segmentation.nii.gz"), label=True)
    names = write_text_atomic(ctx.output_path("segmentation_labels.json"), json.dumps(
        [{"name": name, "value": value, "color": [0.9, 0.6, 0.2] if value == 1 else [0.3, 0.6, 0.9]}
         for value, name in enumerate(model.class_names, start=1)], indent=2) + "\n")
    return {"outputs": {"segmentation": str(output), "labels": str(names)}}


def run_evaluate(ctx: JobContext) -> dict:
    """Dice per class of the base model and of the adapted model against a reference segmentation."""
    image, reference = _pair(ctx.inputs["image"], ctx.inputs["reference"], "held-out")
    base = load_segmentation_model(_model_source(ctx))
    adapted = _model_with_optional_adapter(ctx)
    report = {"classes": base.class_names}
    for step, (name, model) in enumerate((("base", base), ("adapted", adapted))):
        ctx.reporter.check_cancelled()
        labels = segment(model, image, ctx.device)
        report[f"{name}_dice"] = dice_per_class(labels[0], reference[0], model.num_classes)[1:].tolist()
        ctx.reporter.progress("evaluating", step + 1, 2)
    path = write_text_atomic(ctx.output_path("evaluation.json"), json.dumps(report, indent=2) + "\n")
    return {"outputs": {"report": str(path)}, **report}
