"""Segmentation fine-tuning from the scene: train an adapter, apply it, compare it with the base model.

Usable from the Python console without the panel, e.g.::

    logic = slicer.util.getModuleLogic("TenVOOSlicer")
    pairs = [adaptation.TrainingPair(mr1, seg1), adaptation.TrainingPair(mr2, seg2)]
    print(adaptation.preview_parameter_count("deepbet", "tenvoo-l", {"rank": 4}))
    adapter = logic.runJob(adaptation.finetune_request("deepbet", pairs, "tenvoo-l", {"rank": 4}))["adapter"]
    segmentation = logic.runJob(adaptation.infer_request("deepbet", mr3, adapter))["segmentation"]
    rows = logic.runJob(adaptation.compare_request("deepbet", mr4, seg4, adapter))["dice"]
    adaptation.save_adapter_copy(adapter, "/data/adapters/brain T2")     # keep it outside the job folder
    print(adaptation.check_adapter("deepbet", "/data/adapters/brain T2"))  # refuses another base model

The model is ``"deepbet"`` (built-in brain extraction, class ``brain``) or a MedGen segmentation
model folder. Training and reference segmentations are exported on their own volume's grid with the
model's label values, matched by segment name (see :func:`class_values`).

No ``qt`` here; torch and MONAI are imported inside the functions that need them, never at file scope.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from medgen.errors import BadInputError, ModelError
from medgen.slicer.scene import check_selected_once, check_volume_voxels
from medgen.slicer.scene_job import JobRequest, OutputImport, TrainingPair, check_free_destination, move_into

FINETUNE_KIND, INFER_KIND, EVALUATE_KIND = "finetune", "infer", "evaluate"
BUILTIN_MODEL = "deepbet"
#: the adaptation methods of the ``finetune`` job, TenVOO first
METHODS = ("tenvoo-l", "tenvoo-q", "lora", "ia3", "bitfit", "affine-norm", "adaptformer", "linear-probe",
           "spatial-adapter", "full")
#: methods whose size is set by a rank (the panel's rank spin box)
RANKED_METHODS = ("tenvoo-l", "tenvoo-q", "lora")
_VALIDATION_DICE = re.compile(r"validation Dice ([0-9.]+)")



def adapted_class_names(model: str, options: dict | None = None, adapter: str | Path | None = None) -> list[str]:
    """Classes 1.. as an adapted model numbers them: an adapter that replaced the head (``head_rows`` /
    ``head_out_channels``, given as ``options`` or recorded in ``adapter``'s config) brings its own, so label maps
    written for its jobs must use these numbers, not the base model's.

    Raises:
        BadInputError: head options that do not fit the model, or an adapter folder without a readable config.
    """
    import json

    from medgen.models.segmentation import head_class_names
    from medgen.peft.adapter_io import CONFIG_FILE

    if adapter and (Path(adapter) / CONFIG_FILE).exists():  # without it the job names what the folder lacks
        try:
            options = json.loads((Path(adapter) / CONFIG_FILE).read_text(encoding="utf-8")).get("options") or {}
        except (OSError, ValueError, AttributeError) as error:
            raise BadInputError(f"Adapter folder {adapter} has no readable {CONFIG_FILE} ({error}); choose the folder a "
                                "fine-tuning job wrote.") from error
    return head_class_names(model_class_names(model), dict(options or {}))


def model_source(model_folder: str | Path | None) -> str:
    """The model a job uses: the folder when one is given, else the built-in deepbet."""
    return str(model_folder) if model_folder else BUILTIN_MODEL


def model_class_names(model: str) -> list[str]:
    """Names of the model's classes 1..N (background excluded), read without building the network.

    Raises:
        BadInputError: the folder holds no segmentation model.
    """
    if model == BUILTIN_MODEL:
        return ["brain"]
    from medgen.errors import ModelError
    from medgen.models.spec import read_spec

    from medgen.io.model_folder import MODEL_JSON

    if (Path(model) / MODEL_JSON).is_file():
        raise BadInputError(f"{model} holds a MedGen generative model ({MODEL_JSON}), not a segmentation model; "
                            "choose a segmentation model folder (model.json + weights) or the built-in model.")
    try:
        names = read_spec(model).class_names
    except ModelError as error:
        raise BadInputError(f"{model} is not a MedGen model folder: {error}") from error
    if len(names) < 2:
        raise BadInputError(f"{model} is not a segmentation model: it names the classes {names}.")
    return list(names[1:])


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise BadInputError(f"Unknown adaptation method {method!r}; choose one of {', '.join(METHODS)}.")


def method_options(method: str, rank: int) -> dict[str, int]:
    """The ``method_options`` the panel sends: the rank for the methods that have one."""
    _check_method(method)
    return {"rank": int(rank)} if method in RANKED_METHODS else {}


def class_values(segmentation_node, class_names: Sequence[str]) -> dict[int, int]:
    """Segment label value -> model class value (1..N), matching segment names to class names.

    Names match ignoring case and surrounding spaces. A segmentation with exactly one segment for a
    one-class model maps to class 1 whatever the segment is called.

    Raises:
        BadInputError: no segments, or a segment whose name is not one of the model's classes.
    """
    from medgen.slicer.segmentations import segment_labels, segment_name_key

    name = segmentation_node.GetName() if segmentation_node is not None else "(none)"
    segments = segment_labels(segmentation_node) if segmentation_node is not None else []
    if not segments:
        raise BadInputError(f"Segmentation '{name}' has no segments; draw or load the structures to learn.")
    if len(segments) == 1 and len(class_names) == 1:
        return {segments[0].value: 1}
    value_of = {segment_name_key(class_name): value for value, class_name in enumerate(class_names, start=1)}
    mapping = {}
    for segment in segments:
        if segment_name_key(segment.name) not in value_of:
            raise BadInputError(
                f"Segment '{segment.name}' of segmentation '{name}' is not a class of the model; "
                f"rename it to one of: {', '.join(class_names)}."
            )
        mapping[segment.value] = value_of[segment_name_key(segment.name)]
    return mapping


def check_pair(pair: TrainingPair, class_names: Sequence[str], what: str) -> None:
    """Refuse, before any job starts, a pair that lacks a node or whose segments are not model classes."""
    if pair.volume is None or pair.segmentation is None:
        raise BadInputError(f"{what} lacks its volume or its segmentation; select both.")
    check_volume_voxels(pair.volume, f"The volume of {what[:1].lower()}{what[1:]}")
    class_values(pair.segmentation, class_names)


def write_pair(pair: TrainingPair, class_names: Sequence[str], folder: Path, stem: str) -> tuple[str, str]:
    """Write the pair's volume and its label map (model class values, on the volume's grid); returns both paths."""
    import torch
    from monai.data import MetaTensor

    from medgen.io import save_volume
    from medgen.slicer.segmentations import segmentation_to_labelmap
    from medgen.slicer.volumes import volume_node_to_file

    mapping = class_values(pair.segmentation, class_names)
    labelmap, _ = segmentation_to_labelmap(pair.segmentation, pair.volume, require_voxels=True)
    lookup = torch.zeros(max(mapping) + 1, dtype=torch.int64)
    for segment_value, class_value in mapping.items():
        lookup[segment_value] = class_value
    labelmap = MetaTensor(lookup[labelmap.as_tensor()], affine=labelmap.affine)
    folder.mkdir(parents=True, exist_ok=True)
    image = volume_node_to_file(pair.volume, folder / f"{stem}_image.nrrd")
    label = save_volume(labelmap, folder / f"{stem}_label.nrrd", label=True)
    return str(image), str(label)


def _model_inputs(model: str) -> dict[str, str]:
    return {} if model == BUILTIN_MODEL else {"model_folder": model}


def preview_parameter_count(model: str, method: str, options: dict | None = None) -> tuple[int, int]:
    """Build the model, inject ``method`` and count: returns ``(trainable, total)`` parameters.

    Runs in this process (seconds for deepbet on a CPU); nothing is trained or saved.
    """
    from medgen.models.segmentation import load_segmentation_model
    from medgen.peft import inject, trainable_parameters

    network = load_segmentation_model(model).network
    inject(network, method, **(options or {}))
    return trainable_parameters(network), sum(parameter.numel() for parameter in network.parameters())


def format_parameter_count(trainable: int, total: int) -> str:
    """``Trainable parameters: 1,234 of 5,678,901 (0.0217 %)``."""
    return f"Trainable parameters: {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.3g} %)"


@dataclasses.dataclass(frozen=True)
class FinetuneRequest(JobRequest):
    """A ``finetune`` job on scene pairs; its result is ``{"adapter": folder, "report": file}``.

    Args:
        adapter_folder: where the trained adapter goes (must not hold anything); None keeps it in the job folder.
    """

    pairs: tuple[TrainingPair, ...] = ()
    validation: TrainingPair | None = None
    class_names: tuple[str, ...] = ()
    adapter_folder: Path | None = None

    def write_inputs(self, folder: Path) -> dict[str, Any]:
        written = [write_pair(pair, self.class_names, folder, f"pair{n:03d}") for n, pair in enumerate(self.pairs)]
        images, labels = zip(*written)
        inputs = {"images": list(images), "labels": list(labels), **self.input_files}
        if self.validation is not None:
            inputs["val_image"], inputs["val_label"] = write_pair(self.validation, self.class_names, folder, "validation")
        return inputs

    def import_results(self, result: dict, scene=None) -> dict[str, Any]:
        """Nothing enters the scene; returns the adapter folder (moved to ``adapter_folder`` when given)
        and the training report file."""
        adapter = Path(result["outputs"]["adapter"])
        return {"adapter": move_into(adapter, self.adapter_folder) if self.adapter_folder else adapter,
                "report": Path(result["outputs"]["report"])}


def finetune_request(
    model: str, pairs: Sequence[TrainingPair], method: str = "tenvoo-l", options: dict | None = None, *,
    validation: TrainingPair | None = None, adapter_folder: str | Path | None = None, steps: int = 60, lr: float = 1e-3,
    seed: int = 0, **params,
) -> FinetuneRequest:
    """A ``finetune`` job: adapt ``model`` to the scene ``pairs`` with ``method``.

    Args:
        model: ``"deepbet"`` or a model folder (see :func:`model_source`).
        pairs: training cases; each segmentation's segments must be named after the model's classes.
        method, options: the adaptation method and its options (e.g. ``{"rank": 4}``).
        validation: a held-out pair for early stopping and the validation Dice readout.
        adapter_folder: where to save the trained adapter (must not hold anything yet); None keeps it in the job folder.
        steps, lr, params: training settings (``batch_size``, ``val_every``, ``patience``, ``foreground_ratio``).

    Raises:
        BadInputError: no pairs, a missing node, a repeated pair, a validation volume that is also trained on,
            a segment that is not a model class, an unknown method,
            or an adapter folder that is not empty.
    """
    _check_method(method)
    adapter_folder = Path(adapter_folder) if adapter_folder else None
    check_free_destination(adapter_folder)
    if not pairs:
        raise BadInputError("No training pairs: add at least one volume with its segmentation.")
    class_names = tuple(adapted_class_names(model, options))  # a replaced head numbers its own classes
    for number, pair in enumerate(pairs, start=1):
        check_pair(pair, class_names, f"Training pair {number}")
    check_selected_once([(pair.volume, pair.segmentation) for pair in pairs], "Training pair")
    if validation is not None:
        check_pair(validation, class_names, "The validation pair")
        if validation.volume.GetID() in {pair.volume.GetID() for pair in pairs}:
            raise BadInputError(f"The validation volume '{validation.volume.GetName()}' is also a training volume; "
                                "validate on a held-out volume, or leave validation empty.")
    return FinetuneRequest(
        FINETUNE_KIND,
        params={"method": method, "method_options": dict(options or {}), "steps": int(steps), "lr": float(lr), **params},
        input_files=_model_inputs(model), seed=seed, pairs=tuple(pairs), validation=validation, class_names=class_names,
        adapter_folder=adapter_folder,
    )


def infer_request(model: str, volume, adapter: str | Path | None = None) -> JobRequest:
    """An ``infer`` job: segment ``volume`` with the (adapted) model; the result comes back as a
    segmentation node with the model's class names on the volume's grid, next to it."""
    if volume is None:
        raise BadInputError("Select the volume to segment.")
    check_volume_voxels(volume, "The volume to segment")
    model_class_names(model)
    suffix = "adapted" if adapter else "base"
    return JobRequest(
        INFER_KIND, input_nodes={"image": volume}, input_files={**_model_inputs(model), **_adapter_input(adapter)},
        imports=(OutputImport("segmentation", f"{volume.GetName()} {suffix} segmentation", "segmentation"),),
    )


def _adapter_input(adapter: str | Path | None) -> dict[str, str]:
    if not adapter:
        return {}
    if not Path(adapter).is_dir():
        raise BadInputError(f"Adapter folder {adapter} does not exist; train an adapter or choose its folder.")
    return {"adapter": str(adapter)}


def save_adapter_copy(adapter: str | Path, destination: str | Path) -> Path:
    """Copy a trained adapter folder (config + safetensors) to ``destination``, all at once or not at all.

    The files are copied into a hidden sibling of ``destination`` and renamed into place, so an
    interrupted copy never leaves a half adapter where the user looks for one.

    Args:
        adapter: the adapter folder a ``finetune`` job wrote.
        destination: a folder that does not exist yet or is empty; never overwritten.

    Returns:
        ``destination``.

    Raises:
        BadInputError: ``adapter`` is not an adapter folder, or ``destination`` holds something already.
    """
    from medgen.peft.adapter_io import CONFIG_FILE, WEIGHTS_FILE

    adapter, destination = Path(adapter), Path(destination)
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (adapter / name).is_file()]
    if missing:
        raise BadInputError(f"{adapter} is not an adapter folder (it lacks {', '.join(missing)}); train an adapter first.")
    check_free_destination(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".part", dir=destination.parent))
    try:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copy2(adapter / name, staging / name)
        check_free_destination(destination)  # the user may have written there meanwhile
        if destination.exists():
            destination.rmdir()
        os.rename(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


def check_adapter(model: str, adapter: str | Path) -> dict[str, Any]:
    """Load ``adapter`` onto ``model`` here, proving that it fits before any job uses it.

    Returns:
        ``{"method", "options", "trainable_parameters"}`` of the adapter.

    Raises:
        BadInputError: ``adapter`` is not a folder.
        ModelError: the adapter files are unreadable, do not fit the network, or were trained on other
            base weights (their SHA-256 differs); the message names the model and says what to choose.
    """
    from medgen.models.segmentation import load_segmentation_model
    from medgen.peft import load_adapter, trainable_parameters
    from medgen.peft.inject import adapter_record

    adapter = Path(adapter)
    if not adapter.is_dir():
        raise BadInputError(f"Adapter folder {adapter} does not exist; choose a folder saved after training.")
    network = load_segmentation_model(model).network
    try:
        load_adapter(network, adapter)
    except ModelError as error:
        raise ModelError(f"The adapter in {adapter} does not fit the selected model ({model}): {error} "
                         "Select the model the adapter was trained from, or choose another adapter.") from error
    record = adapter_record(network)
    return {"method": record.method, "options": dict(record.options), "trainable_parameters": trainable_parameters(network)}


def format_adapter(summary: dict[str, Any]) -> str:
    """``tenvoo-l adapter (rank 4), 1,234 trained parameters``, for the panel's status line."""
    options = ", ".join(f"{key} {value}" for key, value in summary["options"].items())
    method = f"{summary['method']} adapter" + (f" ({options})" if options else "")
    return f"{method}, {summary['trainable_parameters']:,} trained parameters"


@dataclasses.dataclass(frozen=True)
class CompareRequest(JobRequest):
    """An ``evaluate`` job on a scene pair; its result is ``{"dice": rows, "report": file}`` (see :func:`dice_rows`)."""

    pair: TrainingPair | None = None
    class_names: tuple[str, ...] = ()

    def write_inputs(self, folder: Path) -> dict[str, Any]:
        image, reference = write_pair(self.pair, self.class_names, folder, "held_out")
        return {"image": image, "reference": reference, **self.input_files}

    def import_results(self, result: dict, scene=None) -> dict[str, Any]:
        """Nothing enters the scene; returns the Dice table rows and the report file."""
        return {"dice": dice_rows(result), "report": Path(result["outputs"]["report"])}


def compare_request(model: str, volume, reference, adapter: str | Path | None) -> CompareRequest:
    """An ``evaluate`` job: Dice per class of the base and the adapted model on a held-out pair."""
    if not adapter:
        raise BadInputError("Train an adapter or choose its folder before comparing.")
    _adapter_input(adapter)  # a missing folder is named first
    class_names = tuple(adapted_class_names(model, adapter=adapter))  # the job numbers the reference so
    pair = TrainingPair(volume, reference)
    check_pair(pair, class_names, "The held-out pair")
    return CompareRequest(EVALUATE_KIND, input_files={**_model_inputs(model), **_adapter_input(adapter)}, pair=pair,
                          class_names=class_names)


def dice_rows(result: dict) -> list[dict[str, Any]]:
    """The ``evaluate`` result as one row per class: ``{"class", "base_dice", "adapted_dice"}`` (``None`` for a
    class the reference does not draw)."""
    return [{"class": name, "base_dice": base, "adapted_dice": adapted}
            for name, base, adapted in zip(result["classes"], result["base_dice"], result["adapted_dice"])]


def format_dice_rows(rows: Sequence[dict[str, Any]]) -> str:
    """The Dice table as text lines: ``class: base 0.123 -> adapted 0.876`` (``class: not drawn in the reference``)."""
    return "\n".join(f"{row['class']}: not drawn in the reference" if row["base_dice"] is None else
                     f"{row['class']}: base {row['base_dice']:.3f} -> adapted {row['adapted_dice']:.3f}" for row in rows)


class TrainingReadout:
    """The latest training loss and validation Dice, from the worker's progress and log events."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.loss: float | None = None
        self.val_dice: float | None = None

    def record(self, event: dict[str, Any]) -> None:
        """Take one worker event (pass as an ``on_event`` callback)."""
        if event.get("event") == "progress" and event.get("loss") is not None:
            self.step, self.loss = int(event["step"]), float(event["loss"])
        elif event.get("event") == "log":
            match = _VALIDATION_DICE.search(event.get("message", ""))
            if match:
                self.val_dice = float(match.group(1))

    def text(self) -> str:
        """E.g. ``step 20: loss 0.3127 | validation Dice 0.8421``."""
        if self.loss is None:
            return "No training step yet."
        text = f"step {self.step}: loss {self.loss:.4g}"
        return text if self.val_dice is None else f"{text} | validation Dice {self.val_dice:.4f}"
