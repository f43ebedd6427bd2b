"""Benchmark of mask-conditioned synthesis (MRGen-style data engine).

Measures, in one run on one device and on the same (randomly initialised) networks:
- candidates per second per mask for K candidates with CFG + ControlNet: MedGen's loop (true empty-prompt
  embedding as the unconditional branch, two branch passes, chunked) against MONAI's stock
  ``ControlNetDiffusionInferer.sample(cfg=...)`` on the latents + one VAE decode, in fp32 (constant-filled
  unconditional context, both branches in one doubled batch). MONAI's ``ControlNetLatentDiffusionInferer``
  itself cannot drive this model: it resizes ``cn_cond`` to the latent grid, which only fits a ControlNet whose
  conditioning embedding does not downsample, while MRGen's (and ours) embeds the image-resolution mask;
- filter throughput: checker scoring + ``select_candidates`` per candidate.

Throughput does not depend on the weights, so nothing is trained. Defaults: CPU, tiny widths, 32³, 10 steps.
Usage: python bench/bench_maskgen.py [--device cuda] [--size 32 32 32] [--steps 10] [--candidates 4] [--chunk 4] [--full]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import timed, write_results  # noqa: E402

from medgen.labels import make_labels  # noqa: E402
from medgen.synthesis.checker import CheckerConfig, build_checker, score_candidates  # noqa: E402
from medgen.synthesis.filtering import select_candidates  # noqa: E402
from medgen.synthesis.maskgen import MaskGenModel, generate_on_model_grid  # noqa: E402
from medgen.synthesis.maskgen_networks import (  # noqa: E402
    MaskGenConfig,
    build_controlnet,
    build_image_vae,
    build_latent_unet,
    sampling_scheduler,
)
from medgen.synthesis.masks import control_tensor  # noqa: E402
from medgen.synthesis.prompts import LearnedPromptEncoder, Prompt, PromptVocabulary  # noqa: E402


def _model(config: MaskGenConfig, size: tuple[int, int, int], device: torch.device) -> MaskGenModel:
    organs = make_labels(["liver", "kidney"])
    prompt = Prompt("T2 MRI", region="abdomen", organs=("liver", "kidney"))
    encoder = LearnedPromptEncoder(PromptVocabulary.from_prompts([prompt]), config.prompt_embedding_dim)
    unet = build_latent_unet(config)
    networks = [n.to(device).eval() for n in (build_image_vae(config), unet, encoder, build_controlnet(config, len(organs), unet))]
    latent_shape = [config.latent_channels, *(s // config.downsample_factor for s in size)]
    return MaskGenModel({"latent_shape": latent_shape}, config, *networks, 1.0, organs, {"T2 MRI": prompt}, size, torch.eye(4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, nargs=3, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--candidates", type=int, default=None)
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--full", action="store_true", help="the default (GPU) architecture instead of the tiny one")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    size = tuple(args.size or ((128, 128, 128) if gpu else (32, 32, 32)))
    steps = args.steps or (50 if gpu else 10)
    candidates = args.candidates or (20 if gpu else 4)
    chunk = args.chunk or (10 if gpu else 4)
    config = MaskGenConfig() if args.full else MaskGenConfig.tiny()
    model = _model(config, size, device)
    label = torch.zeros((1, *size), dtype=torch.int64)
    label[0, size[0] // 4 : size[0] // 2, 4:-4, 4:-4] = 1
    label[0, size[0] // 2 + 2 : -4, 6:-6, 6:-6] = 2
    prompt = model.prompts["T2 MRI"]
    grid = "x".join(map(str, size))
    rows = []

    def ours():
        return generate_on_model_grid(model, label, prompt, count=candidates, chunk=chunk, steps=steps, guidance_scale=7.0, device=device)

    def monai_stock():
        from monai.inferers import ControlNetDiffusionInferer

        control = control_tensor(label, 2)[None].to(device)
        with torch.no_grad():
            context = model.prompt_encoder.encode_prompts([prompt])
            for start in range(0, candidates, chunk):
                size_now = min(chunk, candidates - start)
                scheduler, _ = sampling_scheduler(config, steps)
                scheduler.set_timesteps(steps)
                latents = ControlNetDiffusionInferer(scheduler).sample(
                    torch.randn((size_now, *model.document["latent_shape"]), device=device), diffusion_model=model.unet,
                    controlnet=model.controlnet, cn_cond=control.expand(size_now, -1, -1, -1, -1), scheduler=scheduler,
                    conditioning=context.expand(size_now, -1, -1), cfg=7.0, verbose=False)
                model.vae.decode(latents / model.scale_factor)

    # alternate the two a few times: on a shared CPU the load drifts between runs
    monai_runs, ours_runs = [], []
    for _ in range(3):
        monai_runs.append(timed(monai_stock, device, repeats=1, warmup=0 if monai_runs else 1))
        ours_runs.append(timed(ours, device, repeats=1, warmup=0 if ours_runs else 1))
    monai_s, monai_peak = sorted(monai_runs)[1]
    ours_s, ours_peak = sorted(ours_runs)[1]
    what = f"{candidates} candidates, {steps} DDIM steps, CFG 7 + ControlNet"
    rows.append({"what": f"{what}, MONAI inferer fp32", "size": grid, "candidates_per_s": candidates / monai_s, "peak_GiB": monai_peak})
    rows.append({"what": f"{what}, MedGen loop fp32", "size": grid, "candidates_per_s": candidates / ours_s, "peak_GiB": ours_peak})
    rows.append({"what": "speed-up vs MONAI (ratio)", "size": "", "candidates_per_s": monai_s / ours_s, "peak_GiB": None})

    checker_config = CheckerConfig() if gpu or args.full else CheckerConfig.tiny()
    checker = build_checker(checker_config, 2).to(device).eval()
    images = torch.rand((candidates, 1, *size))

    def filter_candidates():
        select_candidates(score_candidates(checker, images, label, ["liver", "kidney"], mask_id="m"))

    filter_s, filter_peak = timed(filter_candidates, device, repeats=3)
    rows.append({"what": "filter (checker score + select)", "size": grid, "candidates_per_s": candidates / filter_s, "peak_GiB": filter_peak})
    write_results(f"maskgen_{device.type}", rows, {"size": size, "steps": steps, "candidates": candidates, "chunk": chunk,
                                                 "config": "full" if args.full else "tiny", "checker": dataclasses.asdict(checker_config)})


if __name__ == "__main__":
    main()
