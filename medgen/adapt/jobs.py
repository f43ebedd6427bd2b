"""Worker handlers of the adaptation job kinds: ``finetune``, ``infer`` and ``evaluate``."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch

from medgen.adapt.finetune import FinetuneConfig, check_segmentation_labels, finetune_segmentation
from medgen.errors import BadInputError
from medgen.io import (
    check_not_constant,
    check_same_geometry,
    display_name,
    load_volume,
    nearest_multiple_shape,
    oriented,
    save_volume,
    scale_to_unit,
)
from medgen.io.atomic import write_text_atomic
from medgen.jobs.context import JobContext
from medgen.labels import default_color
from medgen.metrics import dice_per_class
from medgen.models.segmentation import (
    head_class_names,
    load_segmentation_model,
    prepare_volume,
    relabel_by_name,
    segment,
)
from medgen.peft import describe, inject, load_adapter, save_adapter, trainable_parameters
from medgen.peft.inject import adapter_record


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
    model.class_names = head_class_names(model.class_names, ctx.params["method_options"])  # checks head_rows first
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
    """The base segmentation model, adapted when the job names an adapter (with its head's classes)."""
    model = load_segmentation_model(_model_source(ctx))
    if "adapter" in ctx.inputs:
        load_adapter(model.network, ctx.inputs["adapter"])
        model.class_names = head_class_names(model.class_names, adapter_record(model.network).options)
    return model


def run_infer(ctx: JobContext) -> dict:
    """Segment one volume with the base or adapted model; the label map keeps the input's geometry."""
    image = load_volume(ctx.inputs["image"], name=f"input image {Path(ctx.inputs['image']).name}")
    model = _model_with_optional_adapter(ctx)
    ctx.reporter.progress("segmenting", 0, 1)
    labels = segment(model, image, ctx.device)
    ctx.reporter.progress("segmenting", 1, 1)
    output = save_volume(labels, ctx.output_path("segmentation.nii.gz"), label=True)
    names = write_text_atomic(ctx.output_path("segmentation_labels.json"), json.dumps(
        [{"name": name, "value": value, "color": list(default_color(value))}
         for value, name in enumerate(model.class_names, start=1)], indent=2) + "\n")
    return {"outputs": {"segmentation": str(output), "labels": str(names)}}


def run_evaluate(ctx: JobContext) -> dict:
    """Dice per class of the base and the adapted model on a held-out pair (``image`` + ``reference``), and/or
    FID of ``generated`` against ``real`` volumes, naming the feature network in the report."""
    report = _dice_report(ctx) if "image" in ctx.inputs else {}
    if "real" in ctx.inputs:
        report.update(_fid_report(ctx))
    path = write_text_atomic(ctx.output_path("evaluation.json"), json.dumps(report, indent=2) + "\n")
    return {"outputs": {"report": str(path)}, **report}


def _dice_report(ctx: JobContext) -> dict:
    image, reference = _pair(ctx.inputs["image"], ctx.inputs["reference"], "held-out")
    base = load_segmentation_model(_model_source(ctx))
    adapted = _model_with_optional_adapter(ctx)
    # the reference is numbered like the adapted model's classes (a replaced head may keep fewer)
    check_segmentation_labels(adapted, reference, f"The reference {Path(ctx.inputs['reference']).name}")
    report = {"classes": adapted.class_names}
    # a class the reference does not draw has no score (null): a Dice of 0 there would blame the model for it
    drawn = {int(value) for value in torch.unique(reference.as_tensor()).tolist()}
    for step, (name, model) in enumerate((("base", base), ("adapted", adapted))):
        ctx.reporter.check_cancelled()
        labels = relabel_by_name(segment(model, image, ctx.device)[0], model.class_names, adapted.class_names)
        scores = dice_per_class(labels, reference[0], adapted.num_classes)[1:].tolist()
        report[f"{name}_dice"] = [score if value in drawn else None for value, score in enumerate(scores, start=1)]
        ctx.reporter.progress("evaluating", step + 1, 2)
    return report


def _generator_at_timestep_zero(network, batch):
    """A DDPM UNet's features of a clean volume: its prediction at timestep 0."""
    import torch

    return network(batch, timesteps=torch.zeros(len(batch), dtype=torch.long, device=batch.device))


def _segmenter_input(model, volume):
    """``volume`` ``(1, I, J, K)`` as the base segmentation model's input ``(1, D, H, W)``, for its FID features.

    Raises:
        BadInputError: a constant volume, which that model's per-volume normalisation cannot take (what a collapsed
            generator writes): the message says how to measure FID anyway.
    """
    low, high = float(volume.min()), float(volume.max())
    if low == high:
        raise BadInputError(
            f"{display_name(volume, 'A volume')} is constant (every voxel {low:g}), as a collapsed generator writes: the "
            f"base model {model.name} normalises each volume by its own contrast, and this one has none. Leave it out, or "
            "compute FID with feature_model_folder, whose network sees every volume scaled alike."
        )
    return prepare_volume(model, volume)[0].tensor[0]


def _feature_network(ctx: JobContext, example, grid: tuple[int, int, int]):
    """The user's ``feature_model_folder``, else the base model's own encoder; both local, never downloaded.

    Returns ``(feature network, prepare)``: ``prepare`` maps a loaded volume ``(1, I, J, K)`` to the network's
    input ``(1, D, H, W)`` (the base segmentation model's own resizing and normalisation; a generator folder's
    UNet gets every volume resized to ``grid`` and scaled as in its training; another folder's network gets every
    volume scaled alike to [0, 1] by its 0.5-99.5 percentiles, so that scanner units and the generators' [0, 1] do
    not count as a difference).
    """
    from medgen.metrics.distribution import FeatureNetwork, bottleneck_layer, call_network
    from medgen.models import deepbet_spec, load_model

    folder = ctx.inputs.get("feature_model_folder") or ctx.inputs.get("model_folder")
    if folder:
        network, spec = load_model(folder)
        weights = f"model folder {folder}, weights SHA-256 {spec.weights_hash or 'not recorded'}"
        if spec.network == "DiffusionModelUNet":  # a generator sees volumes as it was trained on them
            from medgen.adapt.generator import DiffusionSettings

            _check_generator_grid(network, grid)
            diffusion = DiffusionSettings.from_spec(spec)

            def prepare(volume):
                return diffusion.to_model_range(_scaled_to_grid(volume, grid).as_tensor())
        elif "feature_model_folder" in ctx.inputs:  # the user's own network: both sets scaled alike
            def prepare(volume):
                return scale_to_unit(volume, channel_wise=True).as_tensor()
        else:  # the base segmentation model: its own orientation, resampling and normalisation, as for deepbet
            model = load_segmentation_model(folder)
            network = model.network
            prepare = partial(_segmenter_input, model)
    else:
        model = load_segmentation_model(_model_source(ctx))
        network, spec = model.network, deepbet_spec()
        weights = f"{spec.provenance['source']} wheel, {spec.provenance['archive']}"
        prepare = partial(_segmenter_input, model)
    network.to(ctx.device).eval()
    forward = _generator_at_timestep_zero if spec.network == "DiffusionModelUNet" else call_network
    layer = ctx.params.get("feature_layer") or bottleneck_layer(network, prepare(example), forward)
    feature_network = FeatureNetwork(network, layer, spec.name or Path(folder).name, weights,
                                     "user-supplied" if "feature_model_folder" in ctx.inputs else "base model", forward)
    return feature_network, prepare


def _fid_report(ctx: JobContext) -> dict:
    from medgen.metrics.distribution import fid_report

    real = [load_volume(path, name=f"real volume {Path(path).name}") for path in ctx.inputs["real"]]
    generated = [load_volume(path, name=f"generated volume {Path(path).name}") for path in ctx.inputs["generated"]]
    ctx.reporter.check_cancelled()
    feature_network, prepare = _feature_network(ctx, real[0], tuple(generated[0].shape[1:]))
    ctx.reporter.log(f"FID features: {feature_network.name}, layer {feature_network.layer} ({feature_network.source})")
    return fid_report([prepare(volume) for volume in real], [prepare(volume) for volume in generated], feature_network, ctx.device)


def _generator_volume(path: str, shape: tuple[int, int, int]):
    """A volume file resized to the generator's grid, intensities scaled to [0, 1] (see :func:`_scaled_to_grid`)."""
    volume = load_volume(path, name=Path(path).name)
    check_not_constant(volume, Path(path).name, "to learn from or match")
    return _scaled_to_grid(volume, shape)


def _scaled_to_grid(volume, shape: tuple[int, int, int]):
    """``volume`` on RAS-ordered axes (as DDPM generators are trained, spec tenvoo.md §7.3, so a scan stored in another
    order is not fed mirrored), resized to ``shape`` (trilinear), intensities scaled to [0, 1] (0.5-99.5 percentiles).
    The result's affine places it in the scanner's space."""
    from monai.transforms import Resize

    return scale_to_unit(Resize(spatial_size=shape, mode="trilinear")(oriented(volume, "RAS")))


def _check_generator_grid(unet, shape: tuple[int, int, int]) -> None:
    multiple = 2 ** (len(unet.block_out_channels) - 1)  # the UNet halves every axis once per level after the first
    if any(size % multiple for size in shape):
        raise BadInputError(f"The shape {shape} does not fit this {len(unet.block_out_channels)}-level generator: every "
                            f"axis must be a multiple of {multiple} (e.g. {nearest_multiple_shape(shape, multiple)}).")


def _generator_unet(ctx: JobContext, shape: tuple[int, int, int]):
    """The generator of ``model_folder`` and its :class:`~medgen.adapt.generator.DiffusionSettings` (noise schedule
    and intensity range, from the folder's spec), after checking that it can denoise volumes of ``shape``."""
    from medgen.adapt.generator import DiffusionSettings
    from medgen.models import load_model

    unet, spec = load_model(ctx.inputs["model_folder"])
    if spec.network != "DiffusionModelUNet":
        raise BadInputError(f"{ctx.inputs['model_folder']} holds a {spec.network}, not a DiffusionModelUNet generator.")
    _check_generator_grid(unet, shape)
    diffusion = DiffusionSettings.from_spec(spec)
    ctx.reporter.log(f"noise schedule {diffusion.schedule} {diffusion.beta_start}..{diffusion.beta_end}, "
                     f"T={diffusion.num_train_timesteps}, intensities in {list(diffusion.intensity_range)}")
    return unet, diffusion


def run_finetune_generator(ctx: JobContext) -> dict:
    """Fine-tune a DDPM generator (MedGen model folder) on a few volumes with a PEFT method; save the adapter."""
    import dataclasses

    from medgen.adapt.generator import GeneratorFinetuneConfig, finetune_generator

    shape = tuple(ctx.params["shape"])
    unet, diffusion = _generator_unet(ctx, shape)
    volumes = [_generator_volume(path, shape).as_tensor() for path in ctx.inputs["volumes"]]
    inject(unet, ctx.params["method"], **ctx.params["method_options"])
    ctx.reporter.log(f"{ctx.params['method']}: {trainable_parameters(unet):,} trainable parameters")
    config = GeneratorFinetuneConfig(steps=ctx.params["steps"], lr=ctx.params["lr"], batch_size=ctx.params["batch_size"],
                                     seed=ctx.spec.seed)
    last_loss = finetune_generator(unet, volumes, config, checkpoint_dir=ctx.output_path("checkpoints"), diffusion=diffusion,
                                   device=ctx.device, reporter=ctx.reporter)
    adapter_dir = save_adapter(unet, ctx.output_path("adapter"))
    return {"outputs": {"adapter": str(adapter_dir)}, "last_loss": last_loss, "trainable_parameters": trainable_parameters(unet),
            "diffusion": dataclasses.asdict(diffusion)}


def run_sample_generator(ctx: JobContext) -> dict:
    """Sample N volumes from a base or adapted DDPM generator (on the reference volume's resized grid if given)."""
    import torch
    from monai.data import MetaTensor

    from medgen.adapt.generator import sample_volumes

    shape = tuple(ctx.params["shape"])
    unet, diffusion = _generator_unet(ctx, shape)
    if "adapter" in ctx.inputs:
        load_adapter(unet, ctx.inputs["adapter"])
    affine = _generator_volume(ctx.inputs["reference"], shape).affine if "reference" in ctx.inputs else torch.eye(4, dtype=torch.float64)
    volumes = sample_volumes(unet, ctx.params["count"], shape, diffusion=diffusion, seed=ctx.spec.seed, device=ctx.device,
                             reporter=ctx.reporter)
    outputs = {f"volume_{i:04d}": str(save_volume(MetaTensor(volume, affine=affine), ctx.output_path(f"sample_{i:04d}.nii.gz")))
               for i, volume in enumerate(volumes)}
    return {"outputs": outputs}
