"""A job fed from scene nodes whose results come back as nodes: the flow every module Logic uses.

A :class:`JobRequest` says which job kind to run, which nodes (and files) are its inputs and how
its outputs come back. :class:`SceneJob` writes the inputs into a job folder (volumes as NRRD,
segmentations as a label map on their reference volume's grid plus ``labels.json``), runs the
worker out of process, and imports outputs only after the job succeeded, so a cancelled or failed
job never touches the scene. Every module's Logic mixes in :class:`SceneJobLogicMixin`, so the
panels start, wait for and import jobs the same way.

No ``qt`` here, and nothing that imports torch at file scope: Slicer loads this module at startup,
before the user may have installed torch, so the scene bridge is imported inside the functions.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from medgen.errors import BadInputError, MedGenError
from medgen.labels import load_labels, save_labels
from medgen.slicer.runner import JobRunner, write_job
from medgen.slicer.scene import LABELMAP_CLASS, SCALAR_VOLUME_CLASS, remove_nodes, resolve_scene

#: steps of the built-in ``selftest`` job started by "Check setup": a few seconds on a CPU
SELFTEST_STEPS = 3



@dataclasses.dataclass(frozen=True)
class TrainingPair:
    """One labelled case from the scene: an image volume node and a segmentation node drawn on it."""

    volume: Any
    segmentation: Any


def write_node_inputs(nodes: dict[str, Any], folder: str | os.PathLike, reference_node=None) -> dict[str, str]:
    """Write each node to a file in ``folder``; returns input name -> path for ``job.json``.

    Segmentation nodes are exported on ``reference_node``'s grid (``<name>.nrrd`` + ``<name>_labels.json``).
    """
    from medgen.io import save_volume
    from medgen.slicer.segmentations import segmentation_to_labelmap
    from medgen.slicer.volumes import volume_node_to_file

    folder = Path(folder)
    if nodes:
        folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    for name, node in nodes.items():
        if node.IsA("vtkMRMLSegmentationNode"):
            labelmap, labels = segmentation_to_labelmap(node, reference_node)
            paths[name] = str(save_volume(labelmap, folder / f"{name}.nrrd", label=True))
            save_labels(labels, folder / f"{name}_labels.json")
        else:
            paths[name] = str(volume_node_to_file(node, folder / f"{name}.nrrd"))
    return paths


@dataclasses.dataclass(frozen=True)
class OutputImport:
    """How to bring one job output into the scene.

    Args:
        output: key in the result's ``outputs``.
        node_name: name of the new node.
        as_type: ``volume``, ``labelmap`` or ``segmentation``.
        labels_file: names and colours of a ``segmentation``'s label values (default: ``<stem>_labels.json``
            next to the output file, if present).
    """

    output: str
    node_name: str
    as_type: str = "volume"
    labels_file: str | None = None


def import_outputs(outputs: dict[str, str], imports: list[OutputImport], reference_node=None, scene=None) -> dict[str, Any]:
    """Create one node per :class:`OutputImport`, placed next to ``reference_node``; returns output -> node.

    Outputs on ``reference_node``'s grid get its exact matrix back (:func:`medgen.slicer.volumes.snap_to_grid_of`).
    All or nothing: when one output cannot be imported, the nodes made for the others are removed again.
    """
    from medgen.io import load_volume, volume_stem
    from medgen.slicer.segmentations import labelmap_to_segmentation
    from medgen.slicer.volumes import snap_to_grid_of, tensor_to_volume_node

    if reference_node is not None and reference_node.GetScene() is not resolve_scene(scene):
        reference_node = None  # removed, or the scene was closed while the job ran: import at the scene's root
    nodes = {}
    try:
        for spec in imports:
            path = Path(outputs[spec.output])
            volume = snap_to_grid_of(load_volume(path, label=spec.as_type != "volume"), reference_node)
            if spec.as_type == "segmentation":
                labels_file = Path(spec.labels_file) if spec.labels_file else path.with_name(volume_stem(path) + "_labels.json")
                labels = load_labels(labels_file) if labels_file.exists() else []
                nodes[spec.output] = labelmap_to_segmentation(
                    volume, labels, spec.node_name, scene=scene, reference_node=reference_node
                )
            else:
                nodes[spec.output] = tensor_to_volume_node(
                    volume, spec.node_name, scene=scene, label=spec.as_type == "labelmap", reference_node=reference_node
                )
    except Exception:
        remove_nodes(resolve_scene(scene), *nodes.values())
        raise
    return nodes


@dataclasses.dataclass(frozen=True)
class JobRequest:
    """One job to run on scene nodes: what goes in, and how the results come back.

    Subclasses change :meth:`write_inputs` or :meth:`import_results` for jobs whose inputs or outputs
    are more than one file per node (training sets, generated collections).

    Args:
        kind: the job kind (``selftest``, ``synth-train``, ...), as the worker knows it.
        input_nodes: job input name -> volume or segmentation node to write as that input.
        params: the job's parameters (validated by the worker).
        imports: the outputs to load into the scene after success.
        input_files: job input name -> file path(s) passed as they are (model folders, datasets).
        reference_node: grid for segmentation inputs and where results are placed (default: the first
            scalar volume among ``input_nodes``).
        seed: random seed of the job.
    """

    kind: str
    input_nodes: dict[str, Any] = dataclasses.field(default_factory=dict)
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    imports: tuple[OutputImport, ...] = ()
    input_files: dict[str, Any] = dataclasses.field(default_factory=dict)
    reference_node: Any = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.reference_node is None:
            volumes = (node for node in self.input_nodes.values() if node.IsA(SCALAR_VOLUME_CLASS) and not node.IsA(LABELMAP_CLASS))
            object.__setattr__(self, "reference_node", next(volumes, None))

    def scene_inputs(self) -> tuple:
        """The scene nodes the job reads: its results belong in their scene (none: results of files and models,
        which any scene may take)."""
        return tuple(self.input_nodes.values())

    def write_inputs(self, folder: Path) -> dict[str, Any]:
        """Write the input nodes into ``folder``; returns the ``inputs`` of ``job.json``."""
        return {**write_node_inputs(self.input_nodes, folder, self.reference_node), **self.input_files}

    def import_results(self, result: dict, scene=None) -> dict[str, Any]:
        """Bring the succeeded job's outputs into the scene; returns output name -> new node."""
        return import_outputs(result["outputs"], list(self.imports), self.reference_node, scene)


def check_scene_inputs_remain(request: JobRequest, result: dict, scene=None) -> None:
    """Refuse to import the results of a job all of whose scene inputs left ``scene`` while it ran.

    That happens when the scene was closed (perhaps to open another patient's) or the inputs were deleted: the
    results would land in a scene they do not belong to, or lose the parent transform that placed them.

    Raises:
        BadInputError: naming the inputs and the folder where the results stay.
    """
    nodes = request.scene_inputs()
    if nodes and all(node.GetScene() is not resolve_scene(scene) for node in nodes):
        outputs = result.get("outputs", {})
        kept = os.path.commonpath([str(Path(path).parent) for path in outputs.values()]) if outputs else "the job folder"
        raise BadInputError(
            f"The {request.kind} job's inputs ({', '.join(repr(node.GetName()) for node in nodes)}) left the scene while it "
            f"ran (the scene was closed, or they were deleted), so its results were not loaded into this scene. "
            f"They are kept in {kept}."
        )


def selftest_request(input_volume, output_suffix: str) -> JobRequest:
    """The built-in ``selftest`` job on ``input_volume``; it proves torch, the worker and the import work."""
    if input_volume is None:
        raise BadInputError("Select the volume the self-test runs on.")
    return JobRequest(
        kind="selftest",
        input_nodes={"image": input_volume},
        params={"steps": SELFTEST_STEPS},
        imports=(OutputImport("image", f"{input_volume.GetName()} {output_suffix} selftest"),),
    )


def optional_folder(path) -> Path | None:
    """A folder field of a parameter node, or None when none was chosen (an empty path reads back as ".")."""
    return None if str(path or "") in ("", ".") else Path(path)


def check_free_destination(folder: Path | None) -> None:
    """Refuse a destination folder that already holds something, or is a file (checked again when moving)."""
    if folder is not None and folder.exists() and not folder.is_dir():
        raise BadInputError(f"{folder} is a file, not a folder; choose a folder for the result.")
    if folder is not None and folder.exists() and any(folder.iterdir()):
        raise BadInputError(f"{folder} already exists and is not empty; choose another folder or remove it.")


def move_into(source: str | Path, destination: str | Path) -> Path:
    """Move a finished output folder to where the user asked for it, whole or not at all; never overwrites
    anything. On another file system it is copied into a hidden folder beside ``destination`` and renamed into place,
    so a failed copy (a full disk) leaves no partial folder that would block the next try.

    Raises:
        BadInputError: ``destination`` is taken, or the move failed (the result then stays in ``source``).
    """
    source, destination = Path(source), Path(destination)
    try:
        check_free_destination(destination)  # checked at Apply too; something may have been put there meanwhile
    except BadInputError as error:
        raise BadInputError(f"{error} The result was kept in {source}: move it yourself or use it from there.") from None
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        if destination.exists():
            destination.rmdir()  # empty, as checked: unless something arrived since (another panel's result)
        os.replace(source, destination)  # one rename on the same file system
        return destination
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise BadInputError(f"Could not move the result to {destination} ({error.strerror}); it is in {source}.") from error
    staging = destination.with_name(f".{destination.name}.{os.getpid()}.part")
    try:
        shutil.copytree(source, staging)
        os.replace(staging, destination)
    except (OSError, shutil.Error) as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise BadInputError(f"Could not copy the result to {destination} ({error}); it is still in {source}.") from error
    shutil.rmtree(source, ignore_errors=True)
    return destination


def default_job_root() -> Path:
    """Where jobs go when the user chose no output folder: Slicer's temporary folder."""
    import slicer

    return Path(slicer.app.temporaryPath) / "MedGenJobs"


class SceneJob:
    """Run a :class:`JobRequest`: ``start()``, then ``poll()`` from a timer (or ``wait()``), then ``import_results()``.

    Args:
        request: what to run and how its results come back.
        job_root: folder for job folders (e.g. a user setting, or :func:`default_job_root`).
        device: as in ``job.json``.
        on_event: called with each worker event.
    """

    def __init__(
        self,
        request: JobRequest,
        job_root: str | os.PathLike,
        device: str = "auto",
        on_event: Callable[[dict], None] | None = None,
    ) -> None:
        self.request = request
        inputs_dir = Path(job_root) / f"inputs-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
        try:
            inputs = request.write_inputs(inputs_dir)
            self.job_dir = write_job(job_root, request.kind, inputs, request.params, device=device, seed=request.seed)
        except BaseException:
            shutil.rmtree(inputs_dir, ignore_errors=True)  # a refused job leaves no copies of the scene's volumes
            raise
        self.runner = JobRunner(self.job_dir, on_event=on_event)

    def start(self) -> "SceneJob":
        self.runner.start()
        return self

    def poll(self) -> bool:
        return self.runner.poll()

    def wait(self, timeout_s: float | None = None) -> int:
        return self.runner.wait(timeout_s=timeout_s)

    def cancel(self) -> None:
        self.runner.cancel()

    @property
    def succeeded(self) -> bool:
        return self.runner.returncode == 0 and self.runner.result is not None

    def import_results(self, scene=None) -> dict[str, Any]:
        """Import the outputs of a succeeded job (nothing is imported otherwise; see :func:`check_scene_inputs_remain`)."""
        if not self.succeeded:
            return {}
        check_scene_inputs_remain(self.request, self.runner.result, scene)
        return self.request.import_results(self.runner.result, scene)


class SceneJobLogicMixin:
    """What every MedGen module Logic can do with jobs, from the GUI or from the Python console.

    The module's Logic defines ``applyJobRequest(parameterNode) -> JobRequest`` for its Apply button.
    """

    def startJob(self, request: JobRequest, jobRoot=None, device="auto", onEvent=None) -> JobRunner:
        """Start ``request`` without blocking; returns the runner (the panel polls it)."""
        return SceneJob(request, jobRoot or default_job_root(), device=device, on_event=onEvent).start().runner

    def importResults(self, request: JobRequest, result: dict) -> dict[str, Any]:
        """Bring the finished job's outputs into the scene; returns output name -> new node (see
        :func:`check_scene_inputs_remain`)."""
        check_scene_inputs_remain(request, result)
        return request.import_results(result)

    def runJob(self, request: JobRequest, jobRoot=None, device="auto") -> dict[str, Any]:
        """Run ``request`` to the end (for scripts and self-tests) and return the imported nodes.

        Raises:
            MedGenError: with the worker's message when the job failed.
        """
        runner = self.startJob(request, jobRoot=jobRoot, device=device)
        returncode = runner.wait()
        if returncode != 0 or runner.result is None:
            message = (runner.error or {}).get("message", f"exit code {returncode}")
            raise MedGenError(f"The {request.kind} job failed: {message}")
        return self.importResults(request, runner.result)

    def runSelftest(self, inputVolume, outputSuffix: str, jobRoot=None, device="auto") -> dict[str, Any]:
        """Run the built-in selftest job on ``inputVolume`` to the end; returns the imported output node(s)."""
        return self.runJob(selftest_request(inputVolume, outputSuffix), jobRoot=jobRoot, device=device)


def run_selftest_on_synthetic_volume(logic: SceneJobLogicMixin, outputSuffix: str) -> tuple[tuple, list[tuple]]:
    """The modules' in-Slicer self-test: selftest a small random volume on the CPU.

    Returns:
        the input's voxel array shape and the shapes of the imported output volumes.
    """
    import numpy as np
    import slicer.util

    voxels = np.random.default_rng(0).random((8, 12, 16), dtype=np.float32)
    input_volume = slicer.util.addVolumeFromArray(voxels, name="selftest input")
    outputs = logic.runSelftest(input_volume, outputSuffix, device="cpu")
    return voxels.shape, [slicer.util.arrayFromVolume(node).shape for node in outputs.values()]
