"""Paired synthesis from the scene: train a joint image+label model, generate pairs, import them as nodes.

Usable from the Python console without the panel, e.g.::

    logic = slicer.util.getModuleLogic("MedGenSynthesis")
    request = paired.train_request_from_scene([paired.TrainingPair(ct1, seg1), paired.TrainingPair(ct2, seg2)], shape=[64, 64, 64])
    model = logic.runJob(request)["model"]
    nodes = logic.runJob(paired.generate_request(model, count=4))

No ``qt`` here; torch and MONAI are imported inside the functions that need them, never at file scope.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from medgen.errors import BadInputError
from medgen.labels import LabelInfo, name_key, save_labels
from medgen.slicer.scene import check_selected_once, check_volume_voxels, create_folder, place_in_folder, remove_nodes, resolve_scene, subject_hierarchy
from medgen.slicer.scene_job import JobRequest, OutputImport, TrainingPair, check_free_destination, import_outputs, move_into

TRAIN_KIND = "synth-train"
GENERATE_KIND = "synthesize"
PRESETS = ("tiny", "diff3")



def training_labels(segmentation_nodes: Sequence) -> list[LabelInfo]:
    """One label per segment name over all segmentations (matched by :func:`segment_name_key`), numbered 1..N in
    order of first appearance.

    The same structure may carry different label values in different segmentations; matching by
    name makes the training label maps agree. Each label keeps the colour of its first segment.
    """
    from medgen.slicer.segmentations import segment_labels, segment_name_key

    labels: dict[str, LabelInfo] = {}
    for node in segmentation_nodes:
        for segment in segment_labels(node):
            if segment_name_key(segment.name) not in labels:
                labels[segment_name_key(segment.name)] = LabelInfo(segment.name.strip(), len(labels) + 1, segment.color,
                                                                   segment.terminology)
    return list(labels.values())


def check_training_pairs(pairs: Sequence[TrainingPair]) -> None:
    """Refuse, before any job starts, pairs that cannot make a training set."""
    from medgen.slicer.segmentations import check_segmentation_node

    if not pairs:
        raise BadInputError("No training pairs: add at least one volume with its segmentation, or train from a folder.")
    for number, pair in enumerate(pairs, start=1):
        if pair.volume is None or pair.segmentation is None:
            raise BadInputError(f"Training pair {number} lacks its volume or its segmentation; select both or remove the pair.")
        check_volume_voxels(pair.volume, f"The volume of training pair {number}")
        check_segmentation_node(pair.segmentation)
        if pair.segmentation.GetSegmentation().GetNumberOfSegments() == 0:
            raise BadInputError(
                f"Training pair {number}: segmentation '{pair.segmentation.GetName()}' has no segments. "
                "Draw or load the structures to synthesise, or remove the pair."
            )
        _check_segment_names(pair.segmentation, number)
    check_selected_once([(pair.volume, pair.segmentation) for pair in pairs], "Training pair")


def _check_segment_names(segmentation_node, number: int) -> None:
    """Segment names become the model's label names: each needs one, and none may be the background (value 0)."""
    segmentation = segmentation_node.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        name = segmentation.GetNthSegment(index).GetName()
        if name_key(name) in ("", "background"):
            raise BadInputError(
                f"Training pair {number}: segment {index + 1} of '{segmentation_node.GetName()}' is named {name!r}; "
                "segment names become the model's structures, and the background is every voxel outside them. "
                "Rename the segment, or remove it if it covers the background."
            )


@dataclasses.dataclass(frozen=True)
class TrainRequest(JobRequest):
    """A ``synth-train`` job; its result is the model folder (moved to ``model_folder`` when given).

    Args:
        pairs: scene pairs to train on (empty when ``input_files`` names a folder).
        model_folder: where the trained model goes; None keeps it in the job folder.
    """

    pairs: tuple[TrainingPair, ...] = ()
    model_folder: Path | None = None

    def write_inputs(self, folder: Path) -> dict[str, Any]:
        """Each pair as an image and a label map on the image's own grid, with one shared ``labels.json``."""
        if not self.pairs:
            return super().write_inputs(folder)
        import torch
        from monai.data import MetaTensor

        from medgen.io import save_volume
        from medgen.slicer.segmentations import segment_name_key, segmentation_to_labelmap
        from medgen.slicer.volumes import volume_node_to_file

        folder.mkdir(parents=True, exist_ok=True)
        labels = training_labels([pair.segmentation for pair in self.pairs])
        value_of = {segment_name_key(label.name): label.value for label in labels}
        images, label_maps = [], []
        for index, pair in enumerate(self.pairs):
            labelmap, segments = segmentation_to_labelmap(pair.segmentation, pair.volume, require_voxels=True)
            lookup = torch.zeros(max(segment.value for segment in segments) + 1, dtype=torch.int64)
            for segment in segments:
                lookup[segment.value] = value_of[segment_name_key(segment.name)]
            labelmap = MetaTensor(lookup[labelmap.as_tensor()], affine=labelmap.affine)
            images.append(str(volume_node_to_file(pair.volume, folder / f"pair{index:03d}_image.nrrd")))
            label_maps.append(str(save_volume(labelmap, folder / f"pair{index:03d}_label.nrrd", label=True)))
        return {"images": images, "labels": label_maps, "label_names": str(save_labels(labels, folder / "labels.json"))}

    def import_results(self, result: dict, scene=None) -> dict[str, Any]:
        """Nothing enters the scene; returns ``{"model": <model folder>}``."""
        model = Path(result["outputs"]["model"])
        return {"model": move_into(model, self.model_folder) if self.model_folder else model}


def _train_params(shape: Sequence[int], preset: str, spacing_mm, overrides: dict) -> dict[str, Any]:
    if len(shape) != 3 or any(int(size) < 8 for size in shape):
        raise BadInputError(f"The training grid needs 3 sizes of at least 8 voxels; got {list(shape)}.")
    if preset not in PRESETS:
        raise BadInputError(f"Unknown preset {preset!r}; use one of {', '.join(PRESETS)}.")
    return {"shape": [int(size) for size in shape], "spacing_mm": list(spacing_mm) if spacing_mm else None,
            "preset": preset, **overrides}


def train_request_from_scene(
    pairs: Sequence[TrainingPair], shape: Sequence[int], preset: str = "tiny", *, spacing_mm=None,
    model_folder: str | Path | None = None, seed: int = 0, **overrides,
) -> TrainRequest:
    """A ``synth-train`` job on scene (volume, segmentation) pairs.

    Args:
        pairs: each segmentation is exported on its own volume's grid; segment names shared across
            pairs become one label (see :func:`training_labels`).
        shape: training grid ``[I, J, K]`` in voxels (each divisible by the VAE's downsampling times the latent
            UNet's: 16 for ``tiny``, 32 for ``diff3``; other grids are refused with a suggestion).
        preset: ``tiny`` (minutes on a CPU) or ``diff3`` (the published recipe, needs a GPU).
        spacing_mm: resample every pair to this spacing first; None keeps each pair's spacing.
        model_folder: where to put the trained model (must not hold anything yet); None keeps it in the job folder.
        overrides: training settings (``vae_phase1_steps``, ``vae_phase2_steps``, ``ldm_steps``, ``checkpoint_every``, ...).

    Raises:
        BadInputError: no pairs, a missing node, a repeated pair, a segmentation without segments, a bad grid or preset,
            or a model folder that is not empty.
    """
    check_training_pairs(pairs)
    model_folder = Path(model_folder) if model_folder else None
    check_free_destination(model_folder)
    return TrainRequest(TRAIN_KIND, params=_train_params(shape, preset, spacing_mm, overrides), pairs=tuple(pairs),
                        model_folder=model_folder, seed=seed)


def train_request_from_folder(
    folder: str | Path | None, shape: Sequence[int], preset: str = "tiny", *, spacing_mm=None,
    model_folder: str | Path | None = None, seed: int = 0, **overrides,
) -> TrainRequest:
    """A ``synth-train`` job on an nnU-Net raw folder (``imagesTr``/``labelsTr``) or a flat folder of
    ``{case}_0000.nii.gz`` + ``{case}.nii.gz``; other arguments as :func:`train_request_from_scene`."""
    if folder is None or not Path(folder).is_dir():
        raise BadInputError(f"Training folder {folder} does not exist; pick an nnU-Net raw dataset folder.")
    model_folder = Path(model_folder) if model_folder else None
    check_free_destination(model_folder)
    return TrainRequest(TRAIN_KIND, params=_train_params(shape, preset, spacing_mm, overrides),
                        input_files={"folder": str(folder)}, model_folder=model_folder, seed=seed)


@dataclasses.dataclass(frozen=True)
class GenerateRequest(JobRequest):
    """A ``synthesize`` job whose pairs come back as volume + segmentation nodes in one folder.

    Args:
        nnunet_folder: where the exported nnU-Net dataset is moved (e.g. ``$nnUNet_raw``); None: no export.
    """

    nnunet_folder: Path | None = None

    def import_results(self, result: dict, scene=None) -> dict[str, Any]:
        """Move the nnU-Net dataset (if any) into place, then import the pairs; returns output -> node (or path)."""
        dataset = move_exported_dataset(result["outputs"], self.nnunet_folder)
        return {**import_generated_pairs(result["outputs"], scene), **dataset}


def nnunet_export_params(
    nnunet_folder: str | Path | None, dataset_id: int | None, name: str, channel_name: str
) -> tuple[Path | None, dict[str, Any]]:
    """The nnU-Net export settings of a generation job: ``(destination folder or None, job params)``.

    Raises:
        BadInputError: export asked without a dataset ID, the dataset folder already exists, or a step count
            that does not divide the model's timesteps.
    """
    from medgen.synthesis.nnunet_export import check_channel_of_generated, check_free_dataset_id, dataset_folder_name

    if not nnunet_folder:
        return None, {"nnunet_dataset_id": None}
    if not dataset_id:
        raise BadInputError("Give an nnU-Net dataset ID (1..999) to export the pairs, or clear the export folder.")
    nnunet_folder = Path(nnunet_folder)
    check_free_destination(nnunet_folder / dataset_folder_name(dataset_id, name))
    check_free_dataset_id(nnunet_folder, int(dataset_id), dataset_folder_name(dataset_id, name))
    check_channel_of_generated(channel_name)
    return nnunet_folder, {"nnunet_dataset_id": int(dataset_id), "nnunet_name": name, "channel_name": channel_name}


def move_exported_dataset(outputs: dict[str, str], nnunet_folder: Path | None) -> dict[str, Path]:
    """Move the job's nnU-Net dataset into ``nnunet_folder``; ``{"nnunet_dataset": its new path}``, or ``{}``
    when no export was asked or the job wrote none (nothing to export)."""
    if nnunet_folder is None or "nnunet_dataset" not in outputs:
        return {}
    from medgen.synthesis.nnunet_export import check_free_dataset_id

    exported = Path(outputs["nnunet_dataset"])
    check_free_dataset_id(nnunet_folder, int(exported.name[len("Dataset"):].split("_", 1)[0]), exported.name)  # taken since?
    return {"nnunet_dataset": move_into(exported, nnunet_folder / exported.name)}


def generate_request(
    model_folder: str | Path | None, count: int, *, seed: int = 0, batch_size: int = 1, steps: int = 100,
    nnunet_folder: str | Path | None = None, nnunet_dataset_id: int | None = None,
    nnunet_name: str = "MedGenSynthetic", channel_name: str = "MRI",
) -> GenerateRequest:
    """A ``synthesize`` job: ``count`` pairs from a trained model, optionally exported for nnU-Net.

    Args:
        model_folder: written by a ``synth-train`` job.
        count: number of pairs; ``batch_size`` are denoised together with ``steps`` DDIM steps (a divisor of
            the model's 1000 timesteps).
        seed: the same seed and settings give the same pairs.
        nnunet_folder: nnU-Net raw folder that receives ``Dataset{id:03d}_{name}``; None: no export.
        nnunet_dataset_id, nnunet_name, channel_name: the exported dataset's ID (1..999), name and channel.

    Raises:
        ModelError: the folder holds no joint image+label model.
        BadInputError: export asked without a dataset ID, the dataset folder already exists, or a step count
            that does not divide the model's timesteps.
    """
    from medgen.diffusion import check_ddim_steps
    from medgen.io.model_folder import read_model_json
    from medgen.synthesis.joint_ldm import TASK

    if model_folder is None:
        raise BadInputError("Choose the model folder that a training job wrote.")
    document = read_model_json(model_folder, TASK)
    check_ddim_steps(int(steps), int(document.get("config", {}).get("num_train_timesteps", 1000)))
    nnunet_folder, export = nnunet_export_params(nnunet_folder, nnunet_dataset_id, nnunet_name, channel_name)
    params = {"count": int(count), "batch_size": int(batch_size), "steps": int(steps), **export}
    return GenerateRequest(GENERATE_KIND, params=params, input_files={"model": str(model_folder)}, seed=seed,
                           nnunet_folder=nnunet_folder)


def import_generated_pairs(outputs: dict[str, str], scene=None) -> dict[str, Any]:
    """Load each generated pair as a volume and a segmentation (segment names and colours from the
    pairs folder's ``labels.json``) into one subject-hierarchy folder named after the job.

    Returns:
        ``image_NNNN`` -> volume node and ``label_NNNN`` -> segmentation node; nothing stays in the
        scene if an import fails.
    """
    from medgen.slicer.volumes import file_to_volume_node

    scene = resolve_scene(scene)
    pairs_dir = Path(outputs["pairs"])
    job_name = pairs_dir.parent.parent.name  # JOB_DIR/outputs/pairs
    keys = sorted(name.removeprefix("image_") for name in outputs if name.startswith("image_"))
    if not keys:
        return {}
    folder = create_folder(scene, job_name)
    nodes: dict[str, Any] = {}
    try:
        for key in keys:
            image = file_to_volume_node(outputs[f"image_{key}"], f"syn_{key} image", scene=scene)
            nodes[f"image_{key}"] = image
            place_in_folder(image, folder)
            label_import = OutputImport(f"label_{key}", f"syn_{key} segmentation", "segmentation", str(pairs_dir / "labels.json"))
            nodes.update(import_outputs(outputs, [label_import], reference_node=image, scene=scene))
    except Exception:
        remove_nodes(scene, *nodes.values())
        subject_hierarchy(scene).RemoveItem(folder)
        raise
    return nodes
