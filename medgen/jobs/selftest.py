"""The built-in ``selftest`` job: exercises reading, device compute, progress, cancel and writing."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from medgen.io import load_volume, save_volume
from medgen.jobs.context import JobContext


def smooth_step(volume: torch.Tensor) -> torch.Tensor:
    """One 3x3x3 box-filter pass with edge replication. ``volume``: ``(C, I, J, K)`` float."""
    kernel = torch.full((1, 1, 3, 3, 3), 1.0 / 27.0, dtype=volume.dtype, device=volume.device)
    padded = F.pad(volume.unsqueeze(1), (1, 1, 1, 1, 1, 1), mode="replicate")
    return F.conv3d(padded, kernel).squeeze(1)


def run_selftest(ctx: JobContext) -> dict:
    """Smooth ``inputs.image`` ``params.steps`` times on ``ctx.device``; write ``outputs/selftest.nii.gz``."""
    image = load_volume(ctx.inputs["image"], name=f"input image {Path(ctx.inputs['image']).name}")
    volume = image.as_tensor().to(ctx.device)
    steps = ctx.params["steps"]
    for step in range(steps):
        ctx.reporter.check_cancelled()
        volume = smooth_step(volume)
        if ctx.params["step_delay_s"]:
            time.sleep(ctx.params["step_delay_s"])
        ctx.reporter.progress("smoothing", step + 1, steps, mean=float(volume.mean()))
    output = save_volume(volume.cpu(), ctx.output_path("selftest.nii.gz"), affine=image.affine)
    return {"outputs": {"image": str(output)}}
