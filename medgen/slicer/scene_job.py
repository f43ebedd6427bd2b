"""A job fed from scene nodes whose results come back as nodes: the flow every module Logic uses.

Inputs are written to files in the job folder (volumes as NRRD, segmentations as a label map on
their reference volume's grid plus ``labels.json``), the worker runs out of process, and outputs
are imported only after the job succeeded, so a cancelled or failed job never touches the scene.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import time
from pathlib import Path
from typing import Any, Callable

from medgen.labels import load_labels, save_labels
from medgen.slicer.runner import JobRunner, write_job
from medgen.slicer.segmentations import labelmap_to_segmentation, segmentation_to_labelmap
from medgen.slicer.volumes import LABELMAP_CLASS, file_to_volume_node, volume_node_to_file


def write_node_inputs(nodes: dict[str, Any], folder: str | os.PathLike, reference_node=None) -> dict[str, str]:
    """Write each node to a file in ``folder``; returns input name -> path for ``job.json``.

    Segmentation nodes are exported on ``reference_node``'s grid (``<name>.nrrd`` + ``<name>_labels.json``).
    """
    from medgen.io import save_volume

    folder = Path(folder)
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
        as_type: ``volume``, ``labelmap`` or ``segmentation`` (the latter reads ``<stem>_labels.json`` next to the file if present).
    """

    output: str
    node_name: str
    as_type: str = "volume"


def import_outputs(outputs: dict[str, str], imports: list[OutputImport], reference_node=None, scene=None) -> dict[str, Any]:
    """Create one node per :class:`OutputImport`, placed next to ``reference_node``; returns output -> node."""
    from medgen.io import load_volume

    nodes = {}
    for spec in imports:
        path = Path(outputs[spec.output])
        if spec.as_type == "segmentation":
            labels_file = path.with_name(path.name.split(".")[0] + "_labels.json")
            labels = load_labels(labels_file) if labels_file.exists() else []
            nodes[spec.output] = labelmap_to_segmentation(
                load_volume(path, label=True), labels, spec.node_name, scene=scene, reference_node=reference_node
            )
        else:
            nodes[spec.output] = file_to_volume_node(
                path, spec.node_name, scene=scene, label=spec.as_type == "labelmap", reference_node=reference_node
            )
    return nodes


class SceneJob:
    """Run a job kind on scene nodes: ``start()``, then ``poll()`` from a timer (or ``wait()``), then ``import_results()``.

    Args:
        kind: job kind.
        input_nodes: input name -> volume or segmentation node.
        params: the kind's parameters.
        job_root: folder for job folders (e.g. ``slicer.util.tempDirectory()`` or a user setting).
        device, seed: as in ``job.json``.
        reference_node: grid for segmentation inputs and where results are placed (default: first volume input).
        on_event: called with each worker event.
    """

    def __init__(
        self,
        kind: str,
        input_nodes: dict[str, Any],
        params: dict[str, Any],
        job_root: str | os.PathLike,
        device: str = "auto",
        seed: int = 0,
        reference_node=None,
        on_event: Callable[[dict], None] | None = None,
    ) -> None:
        self.kind = kind
        self.reference_node = reference_node or next(
            (node for node in input_nodes.values() if node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA(LABELMAP_CLASS)), None
        )
        inputs_dir = Path(job_root) / f"inputs-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
        inputs = write_node_inputs(input_nodes, inputs_dir, self.reference_node)
        self.job_dir = write_job(job_root, kind, inputs, params, device=device, seed=seed)
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

    def import_results(self, imports: list[OutputImport], scene=None) -> dict[str, Any]:
        """Import the outputs of a succeeded job (nothing is imported otherwise)."""
        if not self.succeeded:
            return {}
        return import_outputs(self.runner.result["outputs"], imports, self.reference_node, scene)
