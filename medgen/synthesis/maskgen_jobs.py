"""Worker handlers of the mask-conditioned synthesis job kinds ``maskgen-train`` and ``maskgen``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from monai.data import MetaTensor

from medgen.errors import BadInputError
from medgen.io import check_same_geometry, load_volume, volume_stem
from medgen.io.model_folder import read_model_json
from medgen.jobs.context import JobContext
from medgen.labels import load_labels
from medgen.synthesis.filtering import FilterThresholds
from medgen.synthesis.nnunet_export import check_channel_of_generated, export_nnunet
from medgen.synthesis.prepare import prepare_pairs

#: training settings a job may override (names of :class:`MaskGenConfig` fields)
CONFIG_OVERRIDES = ("vae_steps", "unet_steps", "controlnet_steps", "checker_steps", "train_checker", "target_pseudo_labels", "batch_size",
                    "grad_accum_steps", "checkpoint_every", "amp", "seed")


def _source_cases(ctx: JobContext) -> list[tuple[str, MetaTensor, MetaTensor]]:
    images, labels = ctx.inputs["source_images"], ctx.inputs["source_labels"]
    if len(images) != len(labels):
        raise BadInputError(f"Give one label map per source image (got {len(images)} images, {len(labels)} label maps).")
    cases = []
    for image_path, label_path in zip(images, labels):
        image, label = load_volume(image_path, name=Path(image_path).name), load_volume(label_path, label=True, name=Path(label_path).name)
        check_same_geometry(image, label, Path(image_path).name, Path(label_path).name)  # named by file, before prepare_pairs
        cases.append((volume_stem(image_path), image, label))
    return cases


def _target_cases(ctx: JobContext) -> list[tuple[str, MetaTensor, MetaTensor]]:
    """Target images with an all-background label map, so :func:`prepare_pairs` brings them to the same grid."""
    cases = []
    for path in ctx.inputs["target_images"]:
        image = load_volume(path, name=Path(path).name)
        cases.append((volume_stem(path), image, MetaTensor(torch.zeros(image.shape, dtype=torch.int64), affine=image.affine)))
    return cases


def run_maskgen_train(ctx: JobContext) -> dict:
    """Prepare source pairs and target images on one grid, then train the generator into ``outputs/model``."""
    from medgen.synthesis.maskgen_training import train_maskgen
    from medgen.synthesis.maskgen_networks import MaskGenConfig
    from medgen.synthesis.prompts import Prompt

    params = ctx.params
    shape = tuple(params["shape"])
    spacing_mm = tuple(params["spacing_mm"]) if params.get("spacing_mm") else None
    label_names = load_labels(ctx.inputs["label_names"]) if "label_names" in ctx.inputs else None
    source_cases = _source_cases(ctx)
    # one call for both modalities: their spacings are compared together, and the labels come from the sources only
    prepared, organs = prepare_pairs(source_cases + _target_cases(ctx), shape=shape, spacing_mm=spacing_mm, labels=label_names,
                                     reporter=ctx.reporter)
    sources, targets = prepared[: len(source_cases)], prepared[len(source_cases) :]
    if not organs:
        names = [Path(path).name for path in ctx.inputs["source_labels"]]
        raise BadInputError(f"None of the source label maps {names} holds an organ: every voxel is 0 (background). "
                            "Give the label maps that go with the source images.")
    ctx.reporter.log(f"{len(sources)} source and {len(targets)} target volume(s) on a {shape} grid, organs: {[o.name for o in organs]}")
    overrides = {name: params[name] for name in CONFIG_OVERRIDES if name in params}
    overrides.setdefault("seed", ctx.spec.seed)  # the job's seed unless the parameters name another
    overrides["control_encoding"] = params["encoding"]
    for name in ("controlnet_flip_axes", "unet_flip_axes"):
        overrides[name] = tuple(params[name])
    config = MaskGenConfig.tiny(**overrides) if params["preset"] == "tiny" else dataclasses.replace(MaskGenConfig(), **overrides)
    model_dir = train_maskgen(
        [(pair.image, pair.label) for pair in sources], [pair.image for pair in targets], organs, ctx.output_path("model"), config,
        source_prompt=Prompt(params["source_modality"], params["source_attributes"], params["region"]),
        target_prompt=Prompt(params["target_modality"], params["target_attributes"], params["region"]),
        device=ctx.device, reporter=ctx.reporter,
    )
    return {"outputs": {"model": str(model_dir)}}


def run_maskgen(ctx: JobContext) -> dict:
    """Render target-modality images of every mask, keep the accepted ones in ``outputs/pairs`` (+ ``report.json``)
    and optionally export them as an nnU-Net dataset."""
    from medgen.synthesis.maskgen import MODEL_FIELDS, TASK, synthesize_from_masks

    params, model_dir = ctx.params, ctx.inputs["model"]
    if params.get("nnunet_dataset_id"):
        check_channel_of_generated(params["channel_name"])
    document = read_model_json(model_dir, TASK, MODEL_FIELDS)
    masks = [(volume_stem(path), load_volume(path, label=True, name=Path(path).name)) for path in ctx.inputs["masks"]]
    report = synthesize_from_masks(
        model_dir, masks, ctx.output_path("pairs"), target_modality=params["target_modality"], candidates=params["candidates"],
        chunk=params["chunk"], steps=params["steps"], guidance_scale=params["guidance_scale"],
        conditioning_scale=params["conditioning_scale"], thresholds=FilterThresholds(**params["thresholds"]),
        checker=ctx.inputs.get("checker"), seed=ctx.spec.seed,
        device=ctx.device, reporter=ctx.reporter, report_path=ctx.output_path("report.json"),
    )
    outputs = {"pairs": str(ctx.output_path("pairs")), "report": str(report.report_path)}
    if params.get("nnunet_dataset_id") and report.pairs:
        labels = {"background": 0, **{organ["name"]: int(organ["value"]) for organ in document["organs"]}}
        dataset = export_nnunet(
            report.pairs, ctx.output_path("nnUNet_raw"), dataset_id=params["nnunet_dataset_id"], name=params["nnunet_name"],
            labels=labels, channel_name=params["channel_name"], reporter=ctx.reporter,
        )
        outputs["nnunet_dataset"] = str(dataset)
    elif params.get("nnunet_dataset_id"):
        ctx.reporter.log("No candidate was accepted, so no nnU-Net dataset was written.", "warning")
    return {"outputs": outputs, "accepted": len(report.pairs), "masks": {m.mask_id: m.status for m in report.masks}}
