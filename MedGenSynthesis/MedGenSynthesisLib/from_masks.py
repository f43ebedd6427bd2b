"""From masks: train a mask-conditioned model, generate target-modality images for scene masks, keep the
candidates an independent checker agrees with, and import the accepted pairs as nodes.

Usable from the Python console without the panel, e.g.::

    logic = slicer.util.getModuleLogic("MedGenSynthesis")
    request = from_masks.train_request([TrainingPair(ct, ctSegmentation)], [t2a, t2b], source_modality="CT",
                                       target_modality="T2", region="abdomen", shape=[32, 32, 32])
    model = logic.runJob(request)["model"]
    nodes = logic.runJob(from_masks.generate_request(model, [ctSegmentation], "T2", candidates=20))

Segment names are matched to the model's organs by name, so a mask's label values need not follow the
model's numbering. No ``qt`` here; torch and MONAI are imported inside the functions that need them.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Sequence

from medgen.errors import BadInputError, ModelError
from medgen.labels import LabelInfo, load_labels, save_labels
from medgen.slicer.scene import check_selected_once, check_volume_voxels, create_folder, follow_transform_of, place_in_folder, remove_nodes, resolve_scene, subject_hierarchy
from medgen.slicer.scene_job import JobRequest, TrainingPair, check_free_destination
from medgen.synthesis.filtering import FilterThresholds
from MedGenSynthesisLib import paired
from MedGenSynthesisLib.candidate_report import candidate_rows

TRAIN_KIND = "maskgen-train"
GENERATE_KIND = "maskgen"
PRESETS = ("tiny", "mrgen")
ENCODINGS = ("one-hot", "merged")
#: MRGen's acceptance thresholds (spec B.5): strict pass keeps 2 of the top 5, relaxed (all four minus 0.1) keeps 1
DEFAULT_THRESHOLDS = {name: getattr(FilterThresholds(), name) for name in ("avg_confidence", "avg_iou", "organ_iou", "organ_confidence", "top_k")}
#: longest file stem made from a node name: 32 characters are at most 128 bytes, within the job's 150-byte mask ids
MAX_STEM_CHARACTERS = 32
PAIR_IMAGE_SUFFIX = "_image.nii.gz"
PAIR_LABEL_SUFFIX = "_label.nii.gz"


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the panel needs to know about a mask-conditioned model folder.

    Args:
        folder: the model folder.
        organs: the organs it generates, label value ``j`` = ``organs[j-1]``, with display colours.
        target_modalities: modality names it can generate: the one it was trained to fill in first,
            then the other modalities it has a prompt for.
        source_modality: the modality its training masks came with.
    """

    folder: Path
    organs: tuple[LabelInfo, ...]
    target_modalities: tuple[str, ...]
    source_modality: str

    @property
    def organ_names(self) -> list[str]:
        return [organ.name for organ in self.organs]


def model_info(folder: str | Path | None) -> ModelInfo:
    """Read ``medgen_model.json`` of a ``maskgen-train`` model folder.

    Raises:
        BadInputError: no folder given.
        ModelError: the folder holds no mask-conditioned model.
    """
    from medgen.synthesis.maskgen import TASK
    from medgen.io.model_folder import read_model_json

    if folder is None:
        raise BadInputError("Choose the model folder that a mask-model training job wrote.")
    document = read_model_json(folder, TASK)
    try:
        organs = tuple(LabelInfo.from_dict(entry) for entry in document["organs"])
        modalities = dict.fromkeys([document["target_modality"], *document["prompts"]])
        return ModelInfo(Path(folder), organs, tuple(modalities), document["source_modality"])
    except (KeyError, TypeError, ValueError) as error:
        raise ModelError(f"The medgen_model.json of {folder} is incomplete or damaged ({type(error).__name__}: {error}); "
                         "train the model again.") from None


def organ_values(segmentation_node, organs: Sequence[LabelInfo]) -> dict[int, int]:
    """Segment label value -> the model's organ value, matching segment names to organ names.

    Names match ignoring case and surrounding spaces; organs the segmentation lacks are simply absent.

    Raises:
        BadInputError: no segments, or a segment whose name is not an organ of the model (the message
            lists the segment names and the model's organs).
    """
    from medgen.slicer.segmentations import segment_labels, segment_name_key

    name = segmentation_node.GetName()
    segments = segment_labels(segmentation_node)
    if not segments:
        raise BadInputError(f"Segmentation '{name}' has no segments; draw or load the organs to generate images for.")
    value_of = {segment_name_key(organ.name): organ.value for organ in organs}
    unknown = [segment.name for segment in segments if segment_name_key(segment.name) not in value_of]
    if unknown:
        raise BadInputError(
            f"Segmentation '{name}' has segments {unknown} that are not organs of the model. "
            f"Its segments: {[segment.name for segment in segments]}; the model's organs: "
            f"{[organ.name for organ in organs]}. Rename the segments to the model's organ names or remove them."
        )
    return {segment.value: value_of[segment_name_key(segment.name)] for segment in segments}


def _reference_volume(segmentation_node):
    """The volume node whose grid ``segmentation_node`` was exported on (None when it has none)."""
    return segmentation_node.GetNodeReference(segmentation_node.GetReferenceImageGeometryReferenceRole())


def mask_reference(segmentation_node):
    """The volume whose grid a segmentation is exported on: its reference-geometry volume.

    Raises:
        BadInputError: the segmentation names no reference volume.
    """
    reference = _reference_volume(segmentation_node)
    if reference is None:
        raise BadInputError(
            f"Segmentation '{segmentation_node.GetName()}' has no reference volume, so its voxel grid is unknown. "
            "Select its source volume in the Segment Editor (or Segmentations module) first."
        )
    return reference


def _file_stem(name: str, taken: set[str]) -> str:
    """A file-name-safe, unique stem for a node name (the job names its outputs after it): letters of any
    script, digits, '_' and '-' are kept ("肝臓 1" -> "肝臓_1"), anything else becomes '_'; at most
    :data:`MAX_STEM_CHARACTERS` characters before the number that makes it unique."""
    stem = re.sub(r"[^\w-]+", "_", name).strip("_")[:MAX_STEM_CHARACTERS] or "mask"
    unique, number = stem, 2
    while unique in taken:
        unique, number = f"{stem}_{number}", number + 1
    taken.add(unique)
    return unique


def write_mask(segmentation_node, organs: Sequence[LabelInfo], path: Path) -> Path:
    """Write a segmentation as a label map of organ values on its reference volume's grid (exact geometry)."""
    import torch
    from monai.data import MetaTensor

    from medgen.io import save_volume
    from medgen.slicer.segmentations import segmentation_to_labelmap

    mapping = organ_values(segmentation_node, organs)
    labelmap, _ = segmentation_to_labelmap(segmentation_node, mask_reference(segmentation_node))
    lookup = torch.zeros(max(mapping) + 1, dtype=torch.int64)
    for segment_value, organ_value in mapping.items():
        lookup[segment_value] = organ_value
    return save_volume(MetaTensor(lookup[labelmap.as_tensor()], affine=labelmap.affine), path, label=True)


def volume_files(folder: str | Path | None, what: str) -> list[str]:
    """The volume files directly in ``folder`` (sorted), for folder inputs of either job."""
    from medgen.io.volumes import SUPPORTED_SUFFIXES, volume_suffix

    if folder is None or not Path(folder).is_dir():
        raise BadInputError(f"The {what} folder {folder} does not exist; pick a folder of volume files.")
    files = sorted(str(path) for path in Path(folder).iterdir()
                   if path.is_file() and not path.name.startswith(".") and volume_suffix(path))
    if not files:
        raise BadInputError(f"The {what} folder {folder} holds no volume files ({', '.join(SUPPORTED_SUFFIXES)}).")
    return files


# ---------------------------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class TrainRequest(paired.TrainRequest):
    """A ``maskgen-train`` job; its result is the model folder (moved to ``model_folder`` when given).

    Args:
        pairs: source-modality scene pairs (empty when ``input_files`` names source files).
        target_volumes: unlabelled target-modality volume nodes (empty when ``input_files`` names target files).
    """

    target_volumes: tuple = ()
    folder_labels: tuple[LabelInfo, ...] = ()

    def write_inputs(self, folder: Path) -> dict[str, Any]:
        """Source pairs as images + label maps sharing one ``labels.json`` (by segment name), targets as images."""
        from medgen.slicer.volumes import volume_node_to_file

        inputs = dict(self.input_files)
        if self.folder_labels:
            inputs["label_names"] = str(save_labels(list(self.folder_labels), folder / "labels.json"))
        if self.pairs:
            written = super().write_inputs(folder)
            inputs.update(source_images=written["images"], source_labels=written["labels"], label_names=written["label_names"])
        if self.target_volumes:
            folder.mkdir(parents=True, exist_ok=True)
            inputs["target_images"] = [
                str(volume_node_to_file(volume, folder / f"target{index:03d}_image.nrrd"))
                for index, volume in enumerate(self.target_volumes)
            ]
        return inputs


def _source_files(folder: str | Path | None) -> tuple[dict[str, Any], list[LabelInfo]]:
    """Source inputs from an nnU-Net-named folder, and the organs its ``dataset.json`` names (if any)."""
    from medgen.synthesis.prepare import find_nnunet_pairs, nnunet_folder_labels

    if folder is None or not Path(folder).is_dir():
        raise BadInputError(f"Source folder {folder} does not exist; pick an nnU-Net raw dataset folder.")
    triples = find_nnunet_pairs(folder)
    inputs = {"source_images": [str(image) for _, image, _ in triples], "source_labels": [str(label) for _, _, label in triples]}
    return inputs, nnunet_folder_labels(folder)


def train_request(
    source_pairs: Sequence[TrainingPair] = (), target_volumes: Sequence = (), *, source_folder: str | Path | None = None,
    target_folder: str | Path | None = None, source_modality: str, target_modality: str, region: str = "",
    shape: Sequence[int] = (32, 32, 32), preset: str = "tiny", encoding: str = "one-hot", spacing_mm=None,
    model_folder: str | Path | None = None, seed: int = 0, **overrides,
) -> TrainRequest:
    """A ``maskgen-train`` job: source-modality images with masks, plus unlabelled target-modality images.

    Args:
        source_pairs: scene (volume, segmentation) pairs; segment names become the model's organs.
        target_volumes: scene volumes of the target modality (no labels needed).
        source_folder: instead of ``source_pairs``, an nnU-Net raw folder (``imagesTr``/``labelsTr``,
            organ names from its ``dataset.json``) or a flat ``{case}_0000.nii.gz`` + ``{case}.nii.gz`` folder.
        target_folder: instead of ``target_volumes``, a folder of target-modality volume files.
        source_modality, target_modality: modality names put in the prompts (e.g. ``"CT"``, ``"T2 MRI"``).
        region: body region put in the prompts (e.g. ``"abdomen"``).
        shape: training grid ``[I, J, K]`` in voxels; preset: ``tiny`` (CPU minutes) or ``mrgen`` (GPU);
        encoding: masks as ``one-hot`` channels (recommended in 3D) or MRGen's ``merged`` single channel.
        spacing_mm: resample to this spacing first; None keeps each volume's spacing.
        model_folder: where to put the trained model (must not hold anything yet); None keeps it in the job folder.
        overrides: step counts, ``amp``, ``target_pseudo_labels`` and the flip axes of the job kind.

    Raises:
        BadInputError: no source or no target data, missing or repeated nodes, empty names, a bad grid, preset or
            encoding, or a model folder that is not empty.
    """
    if source_pairs:
        paired.check_training_pairs(source_pairs)
        input_files, folder_labels = {}, []
    elif source_folder is not None:
        input_files, folder_labels = _source_files(source_folder)
    else:
        raise BadInputError("No source data: add source-modality volumes with their segmentations, or pick a source folder.")
    if any(volume is None for volume in target_volumes):
        raise BadInputError("A target-modality row has no volume selected; select one or remove the row.")
    for number, volume in enumerate(target_volumes, start=1):
        check_volume_voxels(volume, f"Target-modality volume {number}")
    check_selected_once([(volume,) for volume in target_volumes], "Target-modality volume")
    if not target_volumes:
        if target_folder is None:
            raise BadInputError("No target-modality data: select unlabelled target volumes, or pick a target folder.")
        input_files["target_images"] = volume_files(target_folder, "target-modality")
    if not source_modality.strip() or not target_modality.strip():
        raise BadInputError("Name the source and the target modality (e.g. 'CT' and 'T2 MRI'); the prompts need both.")
    if source_modality.strip() == target_modality.strip():
        raise BadInputError(f"Source and target modality are both '{source_modality}'; the target must be another modality.")
    if preset not in PRESETS:
        raise BadInputError(f"Unknown preset {preset!r}; use one of {', '.join(PRESETS)}.")
    if encoding not in ENCODINGS:
        raise BadInputError(f"Unknown mask encoding {encoding!r}; use one of {', '.join(ENCODINGS)}.")
    if len(shape) != 3 or any(int(size) < 8 for size in shape):
        raise BadInputError(f"The training grid needs 3 sizes of at least 8 voxels; got {list(shape)}.")
    model_folder = Path(model_folder) if model_folder else None
    check_free_destination(model_folder)
    params = {"shape": [int(size) for size in shape], "spacing_mm": list(spacing_mm) if spacing_mm else None,
              "preset": preset, "source_modality": source_modality.strip(), "target_modality": target_modality.strip(),
              "region": region.strip(), "encoding": encoding, **overrides}
    return TrainRequest(TRAIN_KIND, params=params, pairs=tuple(source_pairs), target_volumes=tuple(target_volumes),
                        folder_labels=tuple(folder_labels), input_files=input_files, model_folder=model_folder, seed=seed)


# -------------------------------------------------------------------------------------------- generation


@dataclasses.dataclass(frozen=True)
class GenerateRequest(JobRequest):
    """A ``maskgen`` job whose accepted pairs come back as volume + segmentation nodes in one folder.

    Args:
        masks: segmentation nodes, each written as a label map of the model's organ values on its
            reference volume's grid (``input_files["masks"]`` holds label-map files given as they are).
        organs: the model's organs (names, values, colours).
        nnunet_folder: where the exported nnU-Net dataset is moved (e.g. ``$nnUNet_raw``); None: no export.
    """

    masks: tuple = ()
    organs: tuple[LabelInfo, ...] = ()
    nnunet_folder: Path | None = None

    @property
    def target_modality(self) -> str:
        return self.params["target_modality"]

    def mask_stems(self) -> dict[str, Any]:
        """File stem -> segmentation node, in selection order: the job calls its pairs ``<stem>_<candidate>``.
        Once the inputs are written, the stems they were written under (a node renamed meanwhile keeps its own)."""
        written = getattr(self, "_written_stems", None)
        if written is not None:
            return dict(written)
        taken: set[str] = set()
        return {_file_stem(node.GetName(), taken): node for node in self.masks}

    def scene_inputs(self) -> tuple:
        """The masks and the volumes they were drawn on: the pairs belong with either (a mask deleted while the job
        ran still leaves its volume to place them by)."""
        references = getattr(self, "_written_references", None) or {}
        return (*self.masks, *(node for node in references.values() if node is not None))

    def write_inputs(self, folder: Path) -> dict[str, Any]:
        """Each segmentation as ``<node name>.nii.gz`` (the job names its outputs after the file)."""
        inputs = dict(self.input_files)
        if self.masks:
            stems = self.mask_stems()
            inputs["masks"] = [str(write_mask(node, self.organs, folder / f"{stem}.nii.gz")) for stem, node in stems.items()]
            object.__setattr__(self, "_written_stems", stems)  # the request is frozen; this records what was sent
            # and the grid each mask was written on, whose transform its pairs follow even if the mask is deleted
            object.__setattr__(self, "_written_references", {stem: _reference_volume(node) for stem, node in stems.items()})
        return inputs

    def import_results(self, result: dict, scene=None) -> dict[str, Any]:
        """Move the nnU-Net dataset (if any) into place, then import the accepted pairs (see :meth:`import_pairs`)."""
        outputs = result["outputs"]
        dataset = paired.move_exported_dataset(outputs, self.nnunet_folder)  # none when nothing was accepted
        return {**self.import_pairs(Path(outputs["pairs"]).parent, scene), **dataset}

    def import_pairs(self, outputs_dir: str | Path, scene=None) -> dict[str, Any]:
        """Import the accepted pairs found in a job's ``outputs`` folder: after success, or after a cancel
        (the job keeps the pairs accepted so far; only complete image + label pairs are taken).

        Returns:
            ``{"pairs": {pair id: (volume node, segmentation node)}, "report": report dict or None,
            "candidates": candidate_rows(report)}``; nothing stays in the scene if an import fails.
        """
        outputs_dir = Path(outputs_dir)
        report_file = outputs_dir / "report.json"
        report = json.loads(report_file.read_text(encoding="utf-8")) if report_file.is_file() else None
        # the reference volumes may have been removed while the job ran: their pairs then stay untransformed
        references = getattr(self, "_written_references", None)
        if references is None:
            references = {stem: _reference_volume(node) for stem, node in self.mask_stems().items()}
        pairs = import_accepted_pairs(outputs_dir / "pairs", list(self.organs), self.target_modality, scene, references)
        return {"pairs": pairs, "report": report, "candidates": candidate_rows(report) if report else []}


def generate_request(
    model_folder: str | Path | None, masks: Sequence = (), target_modality: str = "", *, mask_folder: str | Path | None = None,
    candidates: int = 20, chunk: int = 10, steps: int = 50, guidance_scale: float = 7.0, conditioning_scale: float = 1.0,
    thresholds: dict[str, float] | None = None, seed: int = 0, checker_folder: str | Path | None = None,
    nnunet_folder: str | Path | None = None, nnunet_dataset_id: int | None = None,
    nnunet_name: str = "MedGenFromMasks", channel_name: str = "MRI",
) -> GenerateRequest:
    """A ``maskgen`` job: ``candidates`` target-modality images per mask, filtered by a checker.

    Args:
        model_folder: written by a ``maskgen-train`` job.
        masks: segmentation nodes; segment names must be organs of the model (any label values).
        target_modality: one of the model's target modalities (default: its first).
        mask_folder: instead of ``masks``, a folder of label maps already in the model's organ values.
        candidates: images generated per mask, ``chunk`` at a time, each with ``steps`` DDIM steps and
            classifier-free guidance ``guidance_scale``; ``conditioning_scale`` multiplies the ControlNet residuals
            (1 = as trained, > 1 holds the image closer to the mask).
        thresholds: acceptance settings overriding :data:`DEFAULT_THRESHOLDS` (``avg_confidence``,
            ``avg_iou``, ``organ_iou``, ``organ_confidence`` in [0, 1], ``top_k``).
        seed: the same seed and settings give the same candidates.
        checker_folder: what scores the candidates: a maskgen-train ``checker/`` folder or a MedGen segmentation model
            folder whose classes include the organs; None: the model's own checker.
        nnunet_folder: nnU-Net raw folder that receives ``Dataset{id:03d}_{name}``; None: no export.
        nnunet_dataset_id, nnunet_name, channel_name: the exported dataset's ID (1..999), name and channel.

    Raises:
        ModelError: the folder holds no mask-conditioned model.
        BadInputError: no masks, a mask selected twice, a segment that is not an organ of the model, a modality the model does
            not know, thresholds outside [0, 1], or an export without ID or onto an existing dataset.
    """
    info = model_info(model_folder)
    target_modality = target_modality.strip() or next(iter(info.target_modalities), "")
    if info.target_modalities and target_modality not in info.target_modalities:
        raise BadInputError(
            f"The model does not know the modality '{target_modality}'; it generates {list(info.target_modalities)}."
        )
    if any(node is None for node in masks):
        raise BadInputError("A selected mask is missing; select segmentation nodes or a folder of label maps.")
    for node in masks:  # refused here, before any file is written, with both name lists
        organ_values(node, info.organs)
        mask_reference(node)
    check_selected_once([(node,) for node in masks], "Mask")
    if masks:
        input_files = {}
    elif mask_folder is not None:
        input_files = {"masks": volume_files(mask_folder, "mask")}
    else:
        raise BadInputError("No masks: select segmentation nodes, or pick a folder of label maps.")
    merged_thresholds = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    out_of_range = {name: value for name, value in merged_thresholds.items() if name != "top_k" and not 0.0 <= value <= 1.0}
    if out_of_range:
        raise BadInputError(f"Thresholds are fractions in [0, 1]; got {out_of_range}.")
    if checker_folder is not None:
        input_files["checker"] = str(checker_folder)
    nnunet_folder, export = paired.nnunet_export_params(nnunet_folder, nnunet_dataset_id, nnunet_name, channel_name)
    params = {
        "target_modality": target_modality, "candidates": int(candidates), "chunk": int(chunk), "steps": int(steps),
        "guidance_scale": float(guidance_scale), "conditioning_scale": float(conditioning_scale),
        "thresholds": {name: (int(value) if name == "top_k" else float(value)) for name, value in merged_thresholds.items()},
        **export,
    }
    return GenerateRequest(GENERATE_KIND, params=params, input_files={"model": str(info.folder), **input_files}, seed=seed,
                           masks=tuple(masks), organs=info.organs, nnunet_folder=nnunet_folder)


def accepted_pair_files(pairs_dir: str | Path) -> list[tuple[str, Path, Path]]:
    """``(pair id, image, label)`` of every complete pair in a job's pairs folder, sorted by id.

    A pair whose label map is not written yet (a cancel between the two files) is left out; temporary
    files of unfinished writes never match the names.
    """
    pairs_dir = Path(pairs_dir)
    if not pairs_dir.is_dir():
        return []
    pairs = []
    for image in sorted(pairs_dir.glob(f"*{PAIR_IMAGE_SUFFIX}")):
        pair_id = image.name[: -len(PAIR_IMAGE_SUFFIX)]
        label = pairs_dir / f"{pair_id}{PAIR_LABEL_SUFFIX}"
        if label.is_file() and not image.name.startswith("."):
            pairs.append((pair_id, image, label))
    return pairs


def import_accepted_pairs(pairs_dir: str | Path, organs: list[LabelInfo], target_modality: str, scene=None,
                          mask_references: dict[str, Any] | None = None) -> dict[str, tuple]:
    """Load each complete pair as a volume and a segmentation into one subject-hierarchy folder named after the job.

    Segment names and colours come from the pairs folder's ``labels.json`` (``organs`` when it is missing).
    A pair is written on its mask's local grid, so it goes under the parent transform of its mask's reference
    volume (``mask_references``: mask file stem -> volume node; the pair ids are ``<stem>_<candidate>``).

    Returns:
        pair id -> ``(volume node, segmentation node)``; nothing stays in the scene if an import fails.
    """
    from medgen.io import load_volume
    from medgen.slicer.segmentations import labelmap_to_segmentation
    from medgen.slicer.volumes import file_to_volume_node

    pair_files = accepted_pair_files(pairs_dir)
    if not pair_files:
        return {}
    scene = resolve_scene(scene)
    labels_file = Path(pairs_dir) / "labels.json"
    labels = load_labels(labels_file) if labels_file.is_file() else organs
    folder = create_folder(scene, Path(pairs_dir).parent.parent.name)  # JOB_DIR/outputs/pairs
    pairs: dict[str, tuple] = {}
    created = []
    try:
        for pair_id, image_file, label_file in pair_files:
            volume = file_to_volume_node(image_file, f"{pair_id} {target_modality}", scene=scene)
            created.append(volume)
            place_in_folder(volume, folder)
            follow_transform_of(volume, (mask_references or {}).get(pair_id.rsplit("_", 1)[0]))
            segmentation = labelmap_to_segmentation(load_volume(label_file, label=True), labels,
                                                    f"{pair_id} {target_modality} segmentation", scene=scene, reference_node=volume)
            created.append(segmentation)
            pairs[pair_id] = (volume, segmentation)
    except Exception:
        _remove_imported(scene, folder, created)
        raise
    return pairs


def _remove_imported(scene, folder: int, nodes: list) -> None:
    """Undo a partial import: the nodes with their subject-hierarchy items, then the folder."""
    remove_nodes(scene, *nodes)
    subject_hierarchy(scene).RemoveItem(folder)
