"""The README demo: every MedGen step on the offline sample subject, on CPU in minutes.

Every step runs as a job through the worker process, exactly as the Slicer modules run it:
1. ``selftest``: read a volume, compute on the chosen device, write a volume;
2. paired synthesis: train a *tiny* joint image+label diffusion model on augmented copies of the sample
   subject (minutes on CPU; toy quality), generate pairs and export them as an nnU-Net v2 dataset.
"""

from __future__ import annotations

import sys
from pathlib import Path

from medgen.jobs.exit_codes import ExitCode


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def run_demo(out_dir: Path, device: str = "auto", size: str = "tiny") -> int:
    from medgen.cli.main import _run_job_dir
    from medgen.data.samples import load_sample_case, write_sample_case
    from medgen.slicer.runner import write_job

    _say(f"writing the sample subject ({size} grid) to {out_dir / 'sample'}")
    _say("  t1 = real MNI152 T1 template; t2_simulated/pd_simulated = SIMULATED contrasts from its tissue maps")
    paths = write_sample_case(load_sample_case(size), out_dir / "sample")

    _say("step 1: selftest job (read volume -> torch on the chosen device -> write volume) through the worker")
    job_dir = write_job(out_dir / "jobs", "selftest", {"image": str(paths["t1"])}, {"steps": 10}, device=device)
    code = _run_job_dir(job_dir)
    if code != ExitCode.OK:
        _say(f"selftest failed with exit code {code}; see {job_dir / 'events.jsonl'}")
        return code
    _say(f"selftest output: {job_dir / 'outputs' / 'selftest.nii.gz'} (manifest: {job_dir / 'manifest.json'})")

    code = _paired_synthesis_step(out_dir, paths, device)
    if code != ExitCode.OK:
        return code
    _say(f"done. Everything is under {out_dir}")
    return 0


def _augmented_training_pairs(paths: dict, folder: Path) -> Path:
    """Four training pairs from the one sample subject: as is, mirrored left-right, shifted by ±2 voxels."""
    import torch
    from monai.data import MetaTensor

    from medgen.io import load_volume, save_volume

    image, label = load_volume(paths["t1"]), load_volume(paths["tissue_labels"], label=True)
    variants = {
        "orig": lambda v: v,
        "flip": lambda v: torch.flip(v, dims=[1]),
        "up": lambda v: torch.roll(v, shifts=2, dims=3),
        "down": lambda v: torch.roll(v, shifts=-2, dims=3),
    }
    for name, change in variants.items():
        save_volume(MetaTensor(change(image.as_tensor()), affine=image.affine), folder / f"{name}_0000.nii.gz")
        save_volume(MetaTensor(change(label.as_tensor()), affine=label.affine), folder / f"{name}.nii.gz", label=True)
    return folder


def _paired_synthesis_step(out_dir: Path, paths: dict, device: str) -> int:
    from medgen.cli.main import _run_job_dir
    from medgen.io import load_volume
    from medgen.slicer.runner import write_job

    _say("step 2: paired image+label synthesis (joint VAE + latent DDPM, DIFF-3 style)")
    _say("  training a TINY model on 4 augmented copies of the sample subject; on CPU this takes a few minutes")
    _say("  and gives toy-quality pairs: the point is the pipeline, not the images")
    grid = list(load_volume(paths["t1"]).shape[1:])
    grid = [size - size % 8 for size in grid]
    data = _augmented_training_pairs(paths, out_dir / "synthesis" / "training_pairs")
    train_dir = write_job(out_dir / "jobs", "synth-train", {"folder": str(data), "label_names": str(paths["labels"])},
                          {"shape": grid, "preset": "tiny"}, device=device)
    code = _run_job_dir(train_dir)
    if code != ExitCode.OK:
        return code
    synth_dir = write_job(out_dir / "jobs", "synthesize", {"model": str(train_dir / "outputs" / "model")},
                          {"count": 4, "steps": 50, "nnunet_dataset_id": 900, "nnunet_name": "MedGenDemo"}, device=device)
    code = _run_job_dir(synth_dir)
    if code == ExitCode.OK:
        _say(f"generated pairs: {synth_dir / 'outputs' / 'pairs'}")
        _say(f"nnU-Net v2 dataset: {synth_dir / 'outputs' / 'nnUNet_raw' / 'Dataset900_MedGenDemo'}")
    return code


if __name__ == "__main__":
    sys.exit(run_demo(Path(sys.argv[1] if len(sys.argv) > 1 else "demo_output")))
