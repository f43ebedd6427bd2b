"""Benchmark of paired synthesis (issue: MedGenSynthesis part 1).

Measures, in one run on one device:
- joint-VAE and latent-DDPM training step time and peak memory;
- seconds per generated pair for N DDIM steps with MedGen's loop + decode (fp32 as ``generate_pairs`` runs, and
  bf16 autocast on GPU), split into denoising loop and VAE decode, against MONAI's stock
  ``LatentDiffusionInferer.sample`` in fp32, same networks and scheduler.

Defaults: the DIFF-3 architecture at 160x160x128 on CUDA; ``--size 32 --tiny`` on CPU.
Usage: python bench/bench_synthesis.py [--device cuda] [--size 160 160 128] [--steps 100] [--tiny]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import timed, write_results  # noqa: E402

from medgen.diffusion import SIGMOID_SCHEDULE, noise_prediction_loss, sample, strided_timesteps, unet_denoiser  # noqa: E402
from medgen.synthesis.joint_ldm import JointLDMConfig, build_latent_unet, training_scheduler  # noqa: E402
from medgen.synthesis.joint_vae import build_joint_vae, decode_pair, joint_input, joint_vae_loss  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, nargs=3, default=None)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--tiny", action="store_true", help="tiny widths (CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    tiny = args.tiny or device.type == "cpu"
    size = tuple(args.size or ((32, 32, 32) if device.type == "cpu" else (160, 160, 128)))
    steps = args.steps if device.type == "cuda" else min(args.steps, 20)
    config = JointLDMConfig.tiny() if tiny else JointLDMConfig()
    amp = device.type == "cuda"
    rows = []

    vae = build_joint_vae(config.vae_config(3)).to(device)
    image, label = torch.rand(1, 1, *size, device=device), torch.randint(0, 3, (1, 1, *size), device=device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-4)

    def vae_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            reconstruction, mu, sigma = vae(joint_input(image, label))
            loss = joint_vae_loss(reconstruction.float(), image, label, mu.float(), sigma.float(), 1e-6).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    seconds, peak = timed(vae_step, device)
    rows.append({"what": "VAE train step", "size": "x".join(map(str, size)), "s": seconds, "peak_GiB": peak})

    latent_shape = (4, *(s // 8 for s in size))
    unet = build_latent_unet(config).to(device)
    scheduler = training_scheduler(config)
    latent = torch.rand(1, *latent_shape, device=device) * 2 - 1
    unet_optimizer = torch.optim.Adam(unet.parameters(), lr=8e-5)

    def ldm_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = noise_prediction_loss(unet_denoiser(unet), scheduler, latent, loss=F.l1_loss)
        unet_optimizer.zero_grad()
        loss.backward()
        unet_optimizer.step()

    seconds, peak = timed(ldm_step, device)
    rows.append({"what": "LDM train step", "size": "x".join(map(str, latent_shape)), "s": seconds, "peak_GiB": peak})

    vae.eval()
    unet.eval()
    from monai.inferers import LatentDiffusionInferer
    from monai.networks.schedulers import DDIMScheduler

    stride = 1000 // steps

    def ddim():
        ddim_scheduler = DDIMScheduler(num_train_timesteps=1000, schedule=SIGMOID_SCHEDULE, clip_sample=True,
                                       set_alpha_to_one=True, steps_offset=stride - 1)
        ddim_scheduler.set_timesteps(steps)
        return ddim_scheduler

    noise = torch.randn(1, *latent_shape, device=device)
    timesteps = strided_timesteps(1000, steps, stride - 1)

    def medgen_loop(dtype):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype is not None):
            return sample(unet_denoiser(unet), ddim(), noise, timesteps=timesteps, model_dtype=dtype)

    def medgen_decode(z, dtype):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype is not None):
            return decode_pair(vae, z)

    def monai_pair():
        inferer = LatentDiffusionInferer(ddim(), scale_factor=1.0)
        with torch.no_grad():
            inferer.sample(noise, autoencoder_model=vae, diffusion_model=unet, scheduler=inferer.scheduler, verbose=False)

    grid = "x".join(map(str, size))
    monai_s, monai_peak = timed(monai_pair, device, repeats=1)
    rows.append({"what": f"pair, {steps} DDIM steps, MONAI inferer fp32", "size": grid, "s": monai_s, "peak_GiB": monai_peak})
    # fp32 is what generate_pairs runs; bf16 autocast is measured as the alternative
    precisions = {"fp32": None, "bf16 autocast": torch.bfloat16} if amp else {"fp32": None}
    for name, dtype in precisions.items():
        z = medgen_loop(dtype)
        loop_s, _ = timed(lambda: medgen_loop(dtype), device, repeats=1)
        decode_s, _ = timed(lambda: medgen_decode(z, dtype), device, repeats=1)
        total_s, peak = timed(lambda: medgen_decode(medgen_loop(dtype), dtype), device, repeats=1)
        rows.append({"what": f"pair, {steps} DDIM steps, MedGen {name}", "size": grid, "s": total_s, "peak_GiB": peak})
        rows.append({"what": f"  of which denoising loop ({name})", "size": "x".join(map(str, latent_shape)), "s": loop_s, "peak_GiB": None})
        rows.append({"what": f"  of which VAE decode ({name})", "size": grid, "s": decode_s, "peak_GiB": None})
        rows.append({"what": f"speed-up vs MONAI, MedGen {name} (ratio)", "size": "", "s": monai_s / total_s, "peak_GiB": None})
    write_results(f"synthesis_{device.type}", rows, {"size": size, "steps": steps, "tiny": tiny, "amp": amp})


if __name__ == "__main__":
    main()
