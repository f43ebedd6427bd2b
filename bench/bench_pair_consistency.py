"""DIFF-3 pair-consistency check on phantoms (spec C.9 item 10), as a benchmark: slow on CPU.

Phantoms: a dark ellipsoid "cavity" (label 1) inside a bright shell "wall" (label 2) with speckle
noise, random sizes and centres. After a short fit of the joint model it reports:
(a) VAE reconstruction Dice per class on the training phantoms (target >= 0.9);
(b) mean generated image intensity inside generated label 1 vs label 2, and their gap vs the
    training contrast (target: cavity darker, gap within 0.1);
(c) the fraction of generated pairs whose cavity is one connected component enclosed by wall
    (target >= 90 %).
Usage: python bench/bench_pair_consistency.py [--size 16] [--cases 8] [--vae-steps 2500] [--ldm-steps 6000] [--samples 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from medgen.labels import LabelInfo  # noqa: E402
from medgen.metrics import dice_per_class  # noqa: E402
from medgen.models.weights import load_weights_into  # noqa: E402
from medgen.synthesis.joint_ldm import JointLDMConfig, generate_pairs, train_joint_ldm  # noqa: E402
from medgen.synthesis.joint_vae import build_joint_vae, decode_pair, joint_input  # noqa: E402
from medgen.synthesis.prepare import PreparedPair  # noqa: E402

LABELS = [LabelInfo("cavity", 1, (1.0, 0.2, 0.2)), LabelInfo("wall", 2, (0.9, 0.9, 0.3))]
CAVITY_LEVEL, WALL_LEVEL, BACKGROUND_LEVEL = 0.2, 0.8, 0.05


def phantom(size: int, generator: torch.Generator) -> PreparedPair:
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, size)] * 3, indexing="ij"))
    centre = (torch.rand(3, generator=generator) - 0.5) * 0.3
    radii = 0.35 + torch.rand(3, generator=generator) * 0.2
    radius = ((grid - centre.view(3, 1, 1, 1)).pow(2) / radii.view(3, 1, 1, 1).pow(2)).sum(0).sqrt()
    label = torch.zeros(size, size, size, dtype=torch.int64)
    label[radius < 1.5] = 2
    label[radius < 1.0] = 1
    clean = torch.where(label == 1, CAVITY_LEVEL, torch.where(label == 2, WALL_LEVEL, BACKGROUND_LEVEL))
    speckle = 1 + 0.1 * torch.randn((size, size, size), generator=generator)
    affine = torch.eye(4, dtype=torch.float64)
    return PreparedPair("phantom", MetaTensor((clean * speckle).clamp(0, 1)[None], affine=affine), MetaTensor(label[None], affine=affine))


def enclosed_single_cavity(label: np.ndarray) -> bool:
    cavity_components = ndimage.label(label == 1)[1]
    if cavity_components != 1:
        return False
    outside = ndimage.binary_dilation(label == 1) & (label == 0)
    return not outside.any()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--vae-steps", type=int, default=2500)
    parser.add_argument("--ldm-steps", type=int, default=6000)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    pairs = [phantom(args.size, generator) for _ in range(args.cases)]
    config = JointLDMConfig.tiny(vae_phase1_steps=args.vae_steps, vae_phase2_steps=args.vae_steps // 4, ldm_steps=args.ldm_steps,
                                 checkpoint_every=max(args.ldm_steps, args.vae_steps), batch_size=2)
    start = time.perf_counter()
    torch.manual_seed(0)
    model_dir = train_joint_ldm(pairs, LABELS, Path(tempfile.mkdtemp()) / "model", config, device=args.device)
    train_s = time.perf_counter() - start

    vae = load_weights_into(build_joint_vae(config.vae_config(3)), model_dir / "vae.safetensors").eval()
    with torch.no_grad():
        dices, reconstructed_levels = [], []
        for pair in pairs:
            mu, _ = vae.encode(joint_input(pair.image[None].as_tensor(), pair.label[None].as_tensor()))
            image, label = decode_pair(vae, mu)
            true_label = pair.label[0].as_tensor()
            dices.append(dice_per_class(label[0, 0], true_label, num_classes=3))
            reconstructed_levels.append([float(image[0, 0][true_label == c].mean()) for c in (1, 2)])
    dice = np.mean(dices, axis=0)
    cavity_level, wall_level = np.mean(reconstructed_levels, axis=0)

    cavity_means, wall_means, enclosed = [], [], []
    for image, label in generate_pairs(model_dir, args.samples, seed=1, steps=50, device=args.device):
        image, label = image[0].numpy(), label[0].numpy()
        if (label == 1).any() and (label == 2).any():
            cavity_means.append(float(image[label == 1].mean()))
            wall_means.append(float(image[label == 2].mean()))
        enclosed.append(enclosed_single_cavity(label))
    gap = float(np.mean(wall_means) - np.mean(cavity_means)) if cavity_means else float("nan")
    rows = [
        {"check": "(a) VAE reconstruction Dice, cavity", "value": float(dice[1]), "target": ">= 0.9"},
        {"check": "(a) VAE reconstruction Dice, wall", "value": float(dice[2]), "target": ">= 0.9"},
        {"check": "(a) VAE reconstructed mean intensity, cavity", "value": float(cavity_level), "target": f"training {CAVITY_LEVEL}"},
        {"check": "(a) VAE reconstructed mean intensity, wall", "value": float(wall_level), "target": f"training {WALL_LEVEL}"},
        {"check": "(b) generated mean intensity in cavity", "value": float(np.mean(cavity_means)) if cavity_means else float("nan"), "target": f"< wall (training {CAVITY_LEVEL})"},
        {"check": "(b) generated mean intensity in wall", "value": float(np.mean(wall_means)) if wall_means else float("nan"), "target": f"training {WALL_LEVEL}"},
        {"check": "(b) |generated gap - training gap|", "value": abs(gap - (WALL_LEVEL - CAVITY_LEVEL)), "target": "<= 0.1"},
        {"check": "(c) samples with one enclosed cavity", "value": float(np.mean(enclosed)), "target": ">= 0.9"},
        {"check": "training time (s)", "value": train_s, "target": ""},
    ]
    write_results(f"pair_consistency_{torch.device(args.device).type}", rows, vars(args))


if __name__ == "__main__":
    main()
