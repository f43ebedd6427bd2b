"""Benchmark of zero-shot translation wall time per volume (issue: CrossModalTranslate, deliverable 7).

Trains nothing: an LMI-conditioned UNet with random weights has the cost of a trained one. Measures the
seconds to translate one volume with the released 1000-step DDPM and with DDIM, in 2.5D and 3D modes,
with the per-step LMI share. Defaults: the MIDiffusion network at 128x128x64 (2.5D) on CUDA; a tiny
network at 32^3 with few steps on CPU. The short DDIM run goes first and the results file is rewritten after
every run, so a run cut short by a time limit still leaves the seconds per step of what finished.
Usage: python bench/bench_translation.py [--device cuda] [--grid 128 128 64] [--ddpm-steps 1000] [--ddim-steps 50]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from monai.data import MetaTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from medgen.diffusion import check_ddim_steps  # noqa: E402
from medgen.io.model_folder import write_model_json  # noqa: E402
from medgen.models.weights import write_safetensors  # noqa: E402
from medgen.translate.lmi import lmi_map  # noqa: E402
from medgen.translate.model import TASK, TranslationConfig, build_unet, to_model_grid, translate_volume  # noqa: E402


def _model_folder(config: TranslationConfig) -> Path:
    import dataclasses

    folder = Path(tempfile.mkdtemp())
    write_safetensors(build_unet(config).state_dict(), folder / "unet.safetensors")
    write_model_json(folder, TASK, config=dataclasses.asdict(config), training_volumes=0)
    return folder


def _seconds(run, device: torch.device) -> float:
    """Wall seconds of ``run()``, the device's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--grid", type=int, nargs=3)
    parser.add_argument("--ddpm-steps", type=int, help="timesteps of the DDPM run (default 1000 on CUDA, 20 on CPU)")
    parser.add_argument("--ddim-steps", type=int, default=None)
    parser.add_argument("--modes", nargs="+", choices=("2.5d", "3d"), default=["2.5d", "3d"])
    parser.add_argument("--samplers", nargs="+", choices=("ddpm", "ddim"), default=["ddpm", "ddim"])
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    grid = tuple(args.grid or ((128, 128, 64) if on_gpu else (32, 32, 32)))
    ddpm_steps = args.ddpm_steps or (1000 if on_gpu else 20)
    ddim_steps = args.ddim_steps or (50 if on_gpu else 10)
    if "ddim" in args.samplers:
        check_ddim_steps(ddim_steps, ddpm_steps)  # the model is built with T = the DDPM step count
    source = MetaTensor(torch.rand(1, *grid), affine=torch.eye(4, dtype=torch.float64))
    settings = {"grid": grid, "ddpm_steps": ddpm_steps, "ddim_steps": ddim_steps}
    rows = []
    for mode in args.modes:
        base = dict(mode=mode, grid=grid, num_train_timesteps=ddpm_steps, memory_budget_mb=16384 if on_gpu else 1024)
        config = TranslationConfig(**base) if on_gpu else TranslationConfig.tiny(**base)
        folder = _model_folder(config)
        grid_tensor = to_model_grid(source, config, "source").to(device)
        lmi_map(grid_tensor, grid_tensor, memory_budget_mb=config.memory_budget_mb)  # warm-up (kernel compile)
        if on_gpu:  # the first translation also pays the model's first load and cuDNN's algorithm search
            translate_volume(source, folder, sampler="ddim", steps=math.gcd(ddpm_steps, 10), device=device)
        lmi_s = min(_seconds(lambda: lmi_map(grid_tensor, grid_tensor, memory_budget_mb=config.memory_budget_mb), device)
                    for _ in range(3))  # the least disturbed of three: one run swung by 30 % on a shared CPU
        for sampler, steps in (("ddim", ddim_steps), ("ddpm", ddpm_steps)):
            if sampler not in args.samplers:
                continue
            total = _seconds(lambda: translate_volume(source, folder, sampler=sampler, steps=steps, device=device), device)
            rows.append({"mode": mode, "grid": "x".join(map(str, grid)), "sampler": sampler, "steps": steps,
                         "s_per_volume": total, "s_per_step": total / steps, "lmi_s_per_step": lmi_s,
                         "lmi_share": min(1.0, lmi_s * steps / total)})
            write_results(f"translation_{device.type}", rows, settings)


if __name__ == "__main__":
    main()
