"""Modality translation from the scene: train a model on target-modality volumes, translate a volume node.

Usable from the Python console without the panel, e.g.::

    logic = slicer.util.getModuleLogic("CrossModalTranslate")
    model = logic.runJob(translation.train_request_from_scene([t1a, t1b], target_modality="T1"))["model"]
    print(translation.model_info(model).describe())
    t1_like = logic.translate(t2Node, model, sourceModality="T2")   # blocks; returns the new volume node

The model is an LMI-conditioned DDPM trained on the target modality only (``medgen.translate``); it
translates a source of any contrast zero-shot. The source is written with its exact geometry, the
worker resamples it to the model grid and back, and the output comes back as one volume node on the
source's voxel grid, next to the source (same folder, same parent transform).

No ``qt`` here; torch and MONAI are imported inside the functions that need them, never at file scope.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from medgen.errors import BadInputError, ModelError
from medgen.slicer.scene import check_selected_once, check_volume_voxels, place_next_to, remove_nodes
from medgen.slicer.scene_job import JobRequest, OutputImport, check_free_destination, move_into

TRAIN_KIND, TRANSLATE_KIND = "translate-train", "translate"
SAMPLERS = ("ddim", "ddpm")
MODES = ("2.5d", "3d")
PRESETS = ("tiny", "midiffusion")
#: the network weights a ``translate-train`` job writes next to ``medgen_model.json``
WEIGHTS_FILE = "unet.safetensors"
#: the name a translation gets when the model does not record its modality (trained before it was recorded)
UNKNOWN_TARGET = "translated"


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a translation model folder holds, read from its ``medgen_model.json``.

    Args:
        folder: the model folder.
        target_modality: the modality it translates into (e.g. ``"T1"``), or :data:`UNKNOWN_TARGET`.
        mode: ``"2.5d"`` (2D network on axial slices) or ``"3d"``.
        grid: the model grid ``(I, J, K)`` in voxels every source is resampled to.
        conditioned: LMI-conditioned (translates) or unconditional (SDEdit baseline only).
        training_volumes: how many volumes it was trained on.
        num_train_timesteps: T of its noise schedule (DDIM step counts must divide it).
    """

    folder: Path
    target_modality: str
    mode: str
    grid: tuple[int, int, int]
    conditioned: bool
    training_volumes: int
    num_train_timesteps: int = 1000

    def describe(self) -> str:
        """One line for the panel, e.g. ``T1 model: 2.5d, 32x32x32 grid, trained on 3 volumes``."""
        kind = "" if self.conditioned else " (unconditional SDEdit baseline: cannot translate here)"
        grid = "x".join(str(size) for size in self.grid)
        return f"{self.target_modality} model{kind}: {self.mode}, {grid} grid, trained on {self.training_volumes} volume(s)"


def model_info(folder: str | Path | None) -> ModelInfo:
    """Validate a model folder before any job starts and say what it holds.

    Raises:
        BadInputError: no folder chosen, or it does not exist.
        ModelError: no ``medgen_model.json``, one of another task, no settings in it, or no weights file.
    """
    from medgen.io.model_folder import read_model_json
    from medgen.translate.model import TASK

    if folder is None or str(folder) in ("", "."):
        raise BadInputError("Choose the translation model folder (written by 'Train a model' or 'medgen translate-train').")
    folder = Path(folder)
    if not folder.is_dir():
        problem = "is a file, not a folder" if folder.exists() else "does not exist"
        raise BadInputError(f"Model folder {folder} {problem}; choose the folder a translation training wrote.")
    document = read_model_json(folder, TASK)
    config = document.get("config")
    if not isinstance(config, dict) or not {"mode", "grid"} <= set(config):
        raise ModelError(f"{folder}/medgen_model.json has no model settings ('config' with 'mode' and 'grid'); "
                         "re-run the translation training.")
    if not (folder / WEIGHTS_FILE).is_file():
        raise ModelError(f"{folder} has a medgen_model.json but no weights file {WEIGHTS_FILE}; "
                         "the training did not finish: re-run it or choose another folder.")
    try:
        info = ModelInfo(
            folder=folder, target_modality=document.get("target_modality") or UNKNOWN_TARGET, mode=config["mode"],
            grid=tuple(int(size) for size in config["grid"]), conditioned=bool(config.get("conditioned", True)),
            training_volumes=int(document.get("training_volumes", 0)),
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
        )
    except (TypeError, ValueError) as error:
        raise ModelError(f"{folder}/medgen_model.json holds settings of the wrong type ({error}); re-run the translation "
                         "training.") from error
    if info.mode not in MODES or len(info.grid) != 3 or min(info.grid) < 1:
        raise ModelError(f"{folder}/medgen_model.json describes mode {info.mode!r} on grid {list(info.grid)}, which no "
                         f"translation model has (modes {', '.join(MODES)}, three positive sizes); re-run the training.")
    return info


def translated_node_name(source_name: str, target_modality: str, source_modality: str = "") -> str:
    """``"case7 (T2→T1)"``, or ``"case7 (→T1)"`` when the source's modality is not given."""
    return f"{source_name} ({source_modality.strip()}→{target_modality})"


def translate_request(
    source_volume, model_folder: str | Path | None, *, sampler: str = "ddim", steps: int = 50, seed: int = 0,
    source_modality: str = "", memory_budget_mb: float | None = None,
) -> JobRequest:
    """A ``translate`` job: ``source_volume`` into the model's modality.

    Args:
        source_volume: a scalar volume node of any contrast; written with its exact geometry.
        model_folder: written by a ``translate-train`` job (checked here, see :func:`model_info`).
        sampler: ``ddim`` (``steps`` strided steps, fresh noise each step: eta 1) or ``ddpm`` (all T steps, as published; slow).
        steps: DDIM steps, a divisor of the model's T (1000), e.g. 50 (ignored by ``ddpm``).
        seed: the same seed and settings give the same translation.
        source_modality: names the output ``"<source> (<source modality>→<target modality>)"``.
        memory_budget_mb: LMI chunk budget in MB (None: the model's); lower it when the GPU runs out of memory.

    Raises:
        BadInputError: no source or an unusable one (NaN, constant, label map, ...), an unknown
            sampler, steps out of range, or an unconditional model.
        ModelError: the folder is not a valid translation model.
    """
    check_volume_voxels(source_volume, "The source volume")
    info = model_info(model_folder)
    if not info.conditioned:
        raise BadInputError(f"{info.folder} is an unconditional model (the SDEdit baseline); choose an LMI translation "
                            "model, or run the baseline with 'medgen translate --sdedit-start'.")
    if sampler not in SAMPLERS:
        raise BadInputError(f"Unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}.")
    if sampler == "ddim":
        from medgen.diffusion import check_ddim_steps

        check_ddim_steps(int(steps), info.num_train_timesteps)
    if memory_budget_mb is not None and memory_budget_mb <= 0:
        raise BadInputError(f"The memory budget must be positive (MB); got {memory_budget_mb}.")
    name = translated_node_name(source_volume.GetName(), info.target_modality, source_modality)
    return JobRequest(
        TRANSLATE_KIND, input_nodes={"source": source_volume}, input_files={"model": str(info.folder)},
        params={"sampler": sampler, "steps": int(steps), "memory_budget_mb": memory_budget_mb},
        imports=(OutputImport("translated", name),), seed=int(seed),
    )


@dataclasses.dataclass(frozen=True)
class TrainRequest(JobRequest):
    """A ``translate-train`` job; its result is the model folder (moved to ``model_folder`` when given).

    Args:
        volumes: scene volumes to train on (empty when ``input_files`` lists files).
        model_folder: where the trained model goes; None keeps it in the job folder.
    """

    volumes: tuple = ()
    model_folder: Path | None = None

    def write_inputs(self, folder: Path) -> dict[str, Any]:
        """Each scene volume as NRRD with its geometry (the model grid resampling happens in the worker)."""
        if not self.volumes:
            return super().write_inputs(folder)
        from medgen.slicer.volumes import volume_node_to_file

        folder.mkdir(parents=True, exist_ok=True)
        return {"volumes": [str(volume_node_to_file(node, folder / f"target{index:03d}.nrrd"))
                            for index, node in enumerate(self.volumes)], **self.input_files}

    def import_results(self, result: dict, scene=None) -> dict[str, Any]:
        """Nothing enters the scene; returns ``{"model": <model folder>}``."""
        model = Path(result["outputs"]["model"])
        return {"model": move_into(model, self.model_folder) if self.model_folder else model}


def _train_params(target_modality: str, grid: Sequence[int], mode: str, preset: str, steps: int | None) -> dict[str, Any]:
    if not target_modality or not target_modality.strip():
        raise BadInputError("Name the target modality of the training volumes (e.g. T1); translations are named after it.")
    if len(grid) != 3 or any(int(size) < 8 for size in grid):
        raise BadInputError(f"The model grid needs 3 sizes of at least 8 voxels; got {list(grid)}.")
    if mode not in MODES:
        raise BadInputError(f"Unknown mode {mode!r}; use one of {', '.join(MODES)}.")
    if preset not in PRESETS:
        raise BadInputError(f"Unknown preset {preset!r}; use one of {', '.join(PRESETS)}.")
    params = {"target_modality": target_modality.strip(), "grid": [int(size) for size in grid], "mode": mode, "preset": preset}
    from medgen.translate.model import TranslationConfig  # the job's own check of the grid against the preset's network

    settings = {"grid": tuple(params["grid"]), "mode": mode}
    TranslationConfig.tiny(**settings) if preset == "tiny" else TranslationConfig(**settings)
    if steps is not None:
        if int(steps) < 1:
            raise BadInputError(f"Training steps must be at least 1; got {steps}.")
        params["steps"] = int(steps)
    return params


def train_request_from_scene(
    volume_nodes: Sequence, *, target_modality: str, grid: Sequence[int] = (32, 32, 32), mode: str = "2.5d",
    preset: str = "tiny", steps: int | None = None, model_folder: str | Path | None = None, seed: int = 0,
) -> TrainRequest:
    """A ``translate-train`` job on scene volumes of the target modality.

    Args:
        volume_nodes: scalar volumes of the modality the model will produce (e.g. several T1 scans).
        target_modality: their modality, recorded in the model (names the translations).
        grid: model grid ``[I, J, K]`` in voxels (2.5d: ``K`` axial slices of ``I x J``).
        mode: ``2.5d`` (2D network on slices; fast) or ``3d``.
        preset: ``tiny`` (minutes on a CPU, toy quality) or ``midiffusion`` (the published network; needs a GPU).
        steps: optimizer steps (None: the preset's).
        model_folder: where to put the trained model (must not hold anything yet); None keeps it in the job folder.

    Raises:
        BadInputError: no volumes, an unusable or repeated volume, bad settings, or a model folder that is not empty.
    """
    if not volume_nodes:
        raise BadInputError("No training volumes: check at least one volume of the target modality, or train from a folder.")
    for number, node in enumerate(volume_nodes, start=1):
        check_volume_voxels(node, f"Training volume {number}")
    check_selected_once([(node,) for node in volume_nodes], "Training volume")
    params = _train_params(target_modality, grid, mode, preset, steps)
    model_folder = Path(model_folder) if model_folder else None
    check_free_destination(model_folder)
    return TrainRequest(TRAIN_KIND, params=params, volumes=tuple(volume_nodes), model_folder=model_folder, seed=seed)


def volume_files(folder: str | Path | None) -> list[str]:
    """The volume files (NIfTI, NRRD, MetaImage) directly in ``folder``, sorted by name."""
    from medgen.io import SUPPORTED_SUFFIXES

    if folder is None or not Path(folder).is_dir():
        raise BadInputError(f"Training folder {folder} does not exist; choose a folder of target-modality volumes.")
    # Slicer saves segmentations as "<name>.seg.nrrd" next to the scans; "._" files are macOS metadata
    files = sorted(str(path) for path in Path(folder).iterdir()
                   if path.is_file() and path.name.lower().endswith(SUPPORTED_SUFFIXES)
                   and ".seg." not in path.name.lower() and not path.name.startswith("._"))
    if not files:
        raise BadInputError(f"Training folder {folder} holds no volume files ({', '.join(SUPPORTED_SUFFIXES)}).")
    return files


def train_request_from_folder(
    folder: str | Path | None, *, target_modality: str, grid: Sequence[int] = (32, 32, 32), mode: str = "2.5d",
    preset: str = "tiny", steps: int | None = None, model_folder: str | Path | None = None, seed: int = 0,
) -> TrainRequest:
    """A ``translate-train`` job on every volume file in ``folder``; other arguments as :func:`train_request_from_scene`."""
    files = volume_files(folder)
    params = _train_params(target_modality, grid, mode, preset, steps)
    model_folder = Path(model_folder) if model_folder else None
    check_free_destination(model_folder)
    return TrainRequest(TRAIN_KIND, params=params, input_files={"volumes": files}, model_folder=model_folder, seed=seed)


def segmentation_for(volume_node):
    """The segmentation to edit on ``volume_node``: the first one drawn on its grid, else a new empty one
    next to it (so pressing "Segment in Segment Editor" twice does not pile up empty segmentations).

    Raises:
        BadInputError: no volume, or one no longer in a scene (deleted).
    """
    scene = volume_node.GetScene() if volume_node is not None else None
    if scene is None:
        raise BadInputError("Select a volume in the scene to segment (the translated volume was deleted, or none is selected).")
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        segmentation = scene.GetNthNodeByClass(index, "vtkMRMLSegmentationNode")
        if segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is volume_node:
            return segmentation
    name = scene.GenerateUniqueName(f"{volume_node.GetName()} segmentation")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    try:
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        place_next_to(segmentation, volume_node)
    except Exception:
        remove_nodes(scene, segmentation)
        raise
    return segmentation
