"""Worker handlers of the paired-synthesis job kinds ``synth-train`` and ``synthesize``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from medgen.errors import BadInputError
from medgen.io import load_volume, volume_stem
from medgen.io.model_folder import read_model_json
from medgen.jobs.context import JobContext
from medgen.labels import load_labels
from medgen.synthesis.joint_ldm import MODEL_FIELDS, TASK, JointLDMConfig, write_generated_pairs
from medgen.synthesis.nnunet_export import check_channel_of_generated, export_nnunet
from medgen.synthesis.prepare import load_pairs_from_folder, nnunet_folder_labels, prepare_pairs

#: training settings a job may override (names of :class:`JointLDMConfig` fields)
CONFIG_OVERRIDES = ("vae_phase1_steps", "vae_phase2_steps", "ldm_steps", "batch_size", "ldm_batch_size", "grad_accum_steps",
                    "checkpoint_every", "amp")


def _training_pairs(ctx: JobContext) -> list:
    inputs = ctx.inputs
    if "folder" in inputs:
        return load_pairs_from_folder(inputs["folder"])
    images, labels = inputs.get("images", []), inputs.get("labels", [])
    if len(images) != len(labels) or not images:
        raise BadInputError(f"Give as many label maps as images (got {len(images)} images, {len(labels)} label maps).")
    return [
        (volume_stem(image), load_volume(image, name=Path(image).name), load_volume(label, label=True, name=Path(label).name))
        for image, label in zip(images, labels)
    ]


def run_synth_train(ctx: JobContext) -> dict:
    """Prepare the pairs, then train the joint VAE and latent DDPM into ``outputs/model`` (resumable)."""
    params = ctx.params
    if "label_names" in ctx.inputs:
        label_names = load_labels(ctx.inputs["label_names"])
    else:  # an nnU-Net raw folder names its structures in its dataset.json
        label_names = (nnunet_folder_labels(ctx.inputs["folder"]) or None) if "folder" in ctx.inputs else None
    pairs, labels = prepare_pairs(
        _training_pairs(ctx), shape=tuple(params["shape"]),
        spacing_mm=tuple(params["spacing_mm"]) if params.get("spacing_mm") else None, labels=label_names,
        reporter=ctx.reporter,
    )
    ctx.reporter.log(f"{len(pairs)} training pair(s) on a {tuple(params['shape'])} grid, labels: {[l.name for l in labels]}")
    overrides = {name: params[name] for name in CONFIG_OVERRIDES if name in params}
    config = JointLDMConfig.tiny(**overrides) if params["preset"] == "tiny" else dataclasses.replace(JointLDMConfig(), **overrides)
    from medgen.synthesis.joint_ldm import train_joint_ldm

    model_dir = train_joint_ldm(pairs, labels, ctx.output_path("model"), config, device=ctx.device, reporter=ctx.reporter,
                                seed=ctx.spec.seed)
    return {"outputs": {"model": str(model_dir)}}


def run_synthesize(ctx: JobContext) -> dict:
    """Generate ``count`` pairs into ``outputs/pairs`` and optionally an nnU-Net dataset."""
    params, model_dir = ctx.params, ctx.inputs["model"]
    if params.get("nnunet_dataset_id"):
        check_channel_of_generated(params["channel_name"])
    document = read_model_json(model_dir, TASK, MODEL_FIELDS)
    pairs = write_generated_pairs(
        model_dir, params["count"], ctx.output_path("pairs"), seed=ctx.spec.seed, batch_size=params["batch_size"],
        steps=params["steps"], device=ctx.device, reporter=ctx.reporter,
    )
    outputs = {"pairs": str(ctx.output_path("pairs"))}
    outputs.update({f"image_{i:04d}": str(image) for i, (image, _) in enumerate(pairs)})
    outputs.update({f"label_{i:04d}": str(label) for i, (_, label) in enumerate(pairs)})
    if params.get("nnunet_dataset_id") and not pairs:
        ctx.reporter.log("No pairs were generated (count 0), so no nnU-Net dataset was written.", "warning")
    elif params.get("nnunet_dataset_id"):
        labels = {"background": 0, **{entry["name"]: int(entry["value"]) for entry in document["labels"]}}
        dataset = export_nnunet(
            pairs, ctx.output_path("nnUNet_raw"), dataset_id=params["nnunet_dataset_id"], name=params["nnunet_name"],
            labels=labels, channel_name=params["channel_name"], reporter=ctx.reporter,
        )
        outputs["nnunet_dataset"] = str(dataset)
    return {"outputs": outputs, "count": len(pairs)}
