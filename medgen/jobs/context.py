"""What a job handler receives: its validated spec, device, reporter and output folder."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import torch

from medgen.io.atomic import ensure_folder, write_text_atomic
from medgen.jobs.spec import JobSpec
from medgen.progress import Reporter

OUTPUTS_DIR = "outputs"
#: where a re-run of a job that does not resume sets the earlier run's outputs aside
EARLIER_OUTPUTS_DIR = "earlier_outputs"


def set_aside_outputs(job_dir: Path, manifest: Path | None = None) -> Path | None:
    """Move an earlier run's ``outputs/`` to ``earlier_outputs/<stamp>/`` before a job that does not resume runs
    its folder again: the new run's files are then not mixed with the earlier ones (a pairs folder holding both
    runs' pairs, an nnU-Net dataset with every case twice), and nothing is lost.

    Args:
        manifest: that run's archived manifest (``manifests/<stamp>.json``): it names the folder and is copied
            into it as ``manifest.json`` (its output paths name ``outputs/``, where the new run's files now go);
            without one the folder is named after the current time.

    Returns:
        the folder the outputs went to, or None when there were none.
    """
    outputs = Path(job_dir) / OUTPUTS_DIR
    if not outputs.is_dir() or not any(outputs.iterdir()):
        return None
    stamp = manifest.stem if manifest else f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{time.time_ns() % 10**9:09d}"
    destination = ensure_folder(Path(job_dir) / EARLIER_OUTPUTS_DIR) / stamp
    os.replace(outputs, destination)
    if manifest:
        write_text_atomic(destination / "manifest.json", manifest.read_text(encoding="utf-8"))  # a kill leaves no half copy
    return destination


@dataclasses.dataclass
class JobContext:
    """Everything a handler needs; handlers never parse ``job.json`` or touch stdout themselves.

    Args:
        job_dir: the job folder.
        spec: the validated job.
        device: the resolved torch device.
        reporter: progress/log/cancel channel (streams JSON-lines events in the worker).
    """

    job_dir: Path
    spec: JobSpec
    device: torch.device
    reporter: Reporter
    timings_s: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def params(self) -> dict[str, Any]:
        return self.spec.params

    @property
    def inputs(self) -> dict[str, Any]:
        return self.spec.inputs

    def output_path(self, file_name: str) -> Path:
        """Path for an output file under ``JOB_DIR/outputs`` (write it atomically, e.g. with ``save_volume``)."""
        return ensure_folder(self.job_dir / OUTPUTS_DIR) / file_name  # a file in the way is bad input, named
