"""What a job handler receives: its validated spec, device, reporter and output folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from medgen.io.atomic import ensure_folder
from medgen.jobs.spec import JobSpec
from medgen.progress import Reporter

OUTPUTS_DIR = "outputs"


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
