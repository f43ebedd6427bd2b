"""Run a MedGen job on scene volumes: write the inputs, start the worker, import the outputs.

Every MedGen module's Logic class mixes in :class:`VolumeJobLogicMixin`, so the three panels
start, wait for and import jobs the same way; a module only says which job its Apply button
starts (``applyJobRequest``). No ``qt`` here: this runs under plain Python with slicer-core.

The runner and volume helpers are imported inside the functions because this module is loaded
when Slicer starts, before the user may have installed torch, and must not pull it in.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from medgen.errors import MedGenError

#: steps of the built-in ``selftest`` job started by "Check setup": a few seconds on a CPU
SELFTEST_STEPS = 3


@dataclass(frozen=True)
class VolumeJobRequest:
    """One job to run on scene volumes.

    Args:
        kind: the job kind (``selftest``, ...), as the worker knows it.
        input_nodes: job input name -> volume node to write as that input.
        params: the job's parameters (validated by the worker).
        output_node_names: job output name -> name of the volume node to create from it.
        label_outputs: the outputs to load as label maps rather than scalar volumes.
    """

    kind: str
    input_nodes: dict[str, Any]
    params: dict[str, Any]
    output_node_names: dict[str, str]
    label_outputs: frozenset[str] = field(default_factory=frozenset)

    @property
    def reference_node(self):
        """The first input volume: outputs are placed next to it in the subject hierarchy."""
        return next(iter(self.input_nodes.values()))


def selftest_request(input_volume, output_suffix: str) -> VolumeJobRequest:
    """The built-in ``selftest`` job on ``input_volume``; it proves torch, the worker and the import work."""
    return VolumeJobRequest(
        kind="selftest",
        input_nodes={"image": input_volume},
        params={"steps": SELFTEST_STEPS},
        output_node_names={"image": f"{input_volume.GetName()} {output_suffix} selftest"},
    )


def default_job_root() -> Path:
    """Where jobs go when the user chose no output folder: Slicer's temporary folder."""
    import slicer

    return Path(slicer.app.temporaryPath) / "MedGenJobs"


def start_volume_job(
    request: VolumeJobRequest,
    job_root: str | Path,
    device: str = "auto",
    seed: int = 0,
    on_event: Callable[[dict], None] | None = None,
):
    """Write the request's input volumes and job.json under ``job_root`` and start the worker.

    Returns:
        the started :class:`medgen.slicer.runner.JobRunner`.
    """
    from medgen.slicer.runner import JobRunner, write_job
    from medgen.slicer.volumes import volume_node_to_file

    job_root = Path(job_root)
    job_root.mkdir(parents=True, exist_ok=True)
    input_dir = Path(tempfile.mkdtemp(prefix=f"{request.kind}-inputs-", dir=job_root))
    input_paths = {
        name: str(volume_node_to_file(node, input_dir / f"{name}.nrrd")) for name, node in request.input_nodes.items()
    }
    job_dir = write_job(job_root, request.kind, input_paths, request.params, device=device, seed=seed)
    runner = JobRunner(job_dir, on_event=on_event)
    runner.start()
    return runner


def import_job_outputs(request: VolumeJobRequest, result: dict, scene=None) -> list:
    """Load each output named in the request into the scene next to the input; return the new nodes."""
    from medgen.slicer.volumes import file_to_volume_node

    output_paths = result["outputs"]
    return [
        file_to_volume_node(
            output_paths[output_name],
            node_name,
            scene=scene,
            label=output_name in request.label_outputs,
            reference_node=request.reference_node,
        )
        for output_name, node_name in request.output_node_names.items()
    ]


class VolumeJobLogicMixin:
    """What every MedGen module Logic can do with jobs, from the GUI or from the Python console.

    The module's Logic defines ``applyJobRequest(parameterNode) -> VolumeJobRequest``.
    """

    def startJob(self, request: VolumeJobRequest, jobRoot=None, device="auto", onEvent=None):
        """Start ``request`` without blocking; returns the runner (the panel polls it)."""
        return start_volume_job(request, jobRoot or default_job_root(), device=device, on_event=onEvent)

    def importResults(self, request: VolumeJobRequest, result: dict) -> list:
        """Load the finished job's outputs next to its input volume; returns the new nodes."""
        return import_job_outputs(request, result)

    def runJob(self, request: VolumeJobRequest, jobRoot=None, device="auto") -> list:
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

    def runSelftest(self, inputVolume, outputSuffix: str, jobRoot=None, device="auto") -> list:
        """Run the built-in selftest job on ``inputVolume`` to the end; returns the imported output nodes."""
        return self.runJob(selftest_request(inputVolume, outputSuffix), jobRoot=jobRoot, device=device)


def run_selftest_on_synthetic_volume(logic: VolumeJobLogicMixin, outputSuffix: str) -> tuple[tuple, list[tuple]]:
    """The modules' in-Slicer self-test: selftest a small random volume on the CPU.

    Returns:
        the input's voxel array shape and the shapes of the imported output volumes.
    """
    import numpy as np
    import slicer.util

    voxels = np.random.default_rng(0).random((8, 12, 16), dtype=np.float32)
    input_volume = slicer.util.addVolumeFromArray(voxels, name="selftest input")
    outputs = logic.runSelftest(input_volume, outputSuffix, device="cpu")
    return voxels.shape, [slicer.util.arrayFromVolume(node).shape for node in outputs]
